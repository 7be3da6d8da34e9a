import { type LookupAddress, type LookupAllOptions, type LookupOptions, lookup as dnsLookup } from 'node:dns';
import { BlockList, isIP, type LookupFunction } from 'node:net';
import { domainToASCII } from 'node:url';

/**
 * Where `callback_url` deliveries may go (SSRF guard). With no JOBS_CALLBACK_ALLOWED_HOSTS a
 * callback may go to any public host; with a list, only to the hosts it names. Checked twice:
 * the URL's host at submit (a clear 400), and every address the host resolves to when the
 * delivery connects, so a name that later resolves somewhere internal (DNS rebinding) is refused.
 * No Nest and no I/O but the injected resolver, so the rules are unit-tested directly.
 */

/** Why an address is not public. `public` = anything not listed below, i.e. reachable on the internet. */
export type AddressClass = 'public' | 'unspecified' | 'loopback' | 'private' | 'cgnat' | 'link-local' | 'unique-local' | 'multicast' | 'reserved';

const LABELS: Record<Exclude<AddressClass, 'public'>, string> = {
  unspecified: 'an unspecified',
  loopback: 'a loopback',
  private: 'a private',
  cgnat: 'a shared (CGNAT)',
  'link-local': 'a link-local',
  'unique-local': 'a unique-local',
  multicast: 'a multicast',
  reserved: 'a reserved',
};

type Range = readonly [network: string, prefix: number, cls: Exclude<AddressClass, 'public'>];

const IPV4_RANGES: readonly Range[] = [
  ['0.0.0.0', 8, 'unspecified'],
  ['10.0.0.0', 8, 'private'],
  ['100.64.0.0', 10, 'cgnat'],
  ['127.0.0.0', 8, 'loopback'],
  ['169.254.0.0', 16, 'link-local'], // 169.254.169.254: cloud metadata
  ['172.16.0.0', 12, 'private'],
  ['192.0.0.0', 24, 'reserved'], // IETF protocol assignments
  ['192.0.2.0', 24, 'reserved'], // documentation
  ['192.88.99.0', 24, 'reserved'], // 6to4 relay anycast
  ['192.168.0.0', 16, 'private'],
  ['198.18.0.0', 15, 'reserved'], // benchmarking
  ['198.51.100.0', 24, 'reserved'],
  ['203.0.113.0', 24, 'reserved'],
  ['224.0.0.0', 4, 'multicast'],
  ['240.0.0.0', 4, 'reserved'], // and 255.255.255.255
];

// Order matters: the first match names the class (::/128 before the ::/96 around it).
const IPV6_RANGES: readonly Range[] = [
  ['::', 128, 'unspecified'],
  ['::1', 128, 'loopback'],
  ['::', 96, 'reserved'], // IPv4-compatible, deprecated
  ['64:ff9b:1::', 48, 'reserved'], // local-use NAT64
  ['100::', 64, 'reserved'], // discard-only
  ['2001::', 32, 'reserved'], // Teredo tunnels
  ['2001:db8::', 32, 'reserved'], // documentation
  ['fc00::', 7, 'unique-local'],
  ['fe80::', 10, 'link-local'],
  ['fec0::', 10, 'reserved'], // site-local, deprecated
  ['ff00::', 8, 'multicast'],
];

/** IPv6 forms that carry an IPv4 address and reach it: NAT64 (64:ff9b::/96) and 6to4 (2002::/16). */
function embeddedIPv4Ranges(): Range[] {
  return IPV4_RANGES.flatMap(([network, prefix, cls]): Range[] => {
    const [a = 0, b = 0, c = 0, d = 0] = network.split('.').map(Number);
    const high = ((a << 8) | b).toString(16);
    const low = ((c << 8) | d).toString(16);
    return [
      [`64:ff9b::${high}:${low}`, 96 + prefix, cls],
      [`2002:${high}:${low}::`, 16 + prefix, cls],
    ];
  });
}

const CLASSES: ReadonlyArray<readonly [Exclude<AddressClass, 'public'>, BlockList]> = (() => {
  const lists = new Map<Exclude<AddressClass, 'public'>, BlockList>();
  const add = (ranges: readonly Range[], family: 'ipv4' | 'ipv6') => {
    for (const [network, prefix, cls] of ranges) {
      let list = lists.get(cls);
      if (!list) lists.set(cls, (list = new BlockList()));
      list.addSubnet(network, prefix, family);
    }
  };
  // IPv6 first so ::/128 and ::1 are named before ::/96; BlockList matches IPv4-mapped IPv6
  // (::ffff:a.b.c.d) against the IPv4 rules itself.
  add(IPV6_RANGES, 'ipv6');
  add(IPV4_RANGES, 'ipv4');
  add(embeddedIPv4Ranges(), 'ipv6');
  return [...lists];
})();

function family(address: string): 'ipv4' | 'ipv6' | undefined {
  const version = isIP(address);
  return version === 4 ? 'ipv4' : version === 6 ? 'ipv6' : undefined;
}

/** `[::1]` → `::1`, `fe80::1%eth0` → `fe80::1`; anything else unchanged. */
function bareAddress(value: string): string {
  const unbracketed = value.startsWith('[') && value.endsWith(']') ? value.slice(1, -1) : value;
  const zone = unbracketed.indexOf('%');
  return zone >= 0 && unbracketed.includes(':') ? unbracketed.slice(0, zone) : unbracketed;
}

/** The class of an IP address (bracketed IPv6 and zone ids accepted); undefined for a name. */
export function classifyAddress(value: string): AddressClass | undefined {
  const address = bareAddress(value);
  const type = family(address);
  if (!type) return undefined;
  for (const [cls, list] of CLASSES) if (list.check(address, type)) return cls;
  return 'public';
}

/** Names that never mean a public host: single labels (search-domain lookups), localhost, mDNS and private-use TLDs. */
const INTERNAL_SUFFIXES = ['localhost', 'localdomain', 'local', 'internal', 'home.arpa'];
function isInternalName(host: string): boolean {
  return !host.includes('.') || INTERNAL_SUFFIXES.some((suffix) => host === suffix || host.endsWith(`.${suffix}`));
}

/** Lower case, no trailing dot, IDN as punycode; undefined when it is no valid host name. */
function hostName(value: string): string | undefined {
  const ascii = domainToASCII(value.replace(/\.$/, '').toLowerCase());
  if (!/^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*$/.test(ascii)) return undefined;
  // A numeric last label makes WHATWG URL parse the host as IPv4 (`1.2.3` → 1.2.0.3): never a name.
  const last = ascii.slice(ascii.lastIndexOf('.') + 1);
  return /^(?:\d+|0x[0-9a-f]*)$/.test(last) ? undefined : ascii;
}

/**
 * JOBS_CALLBACK_ALLOWED_HOSTS → normalised entries: `name`, `*.suffix`, `address/prefix` (a bare
 * address becomes /32 or /128). Every bad entry is a problem, so config lists them all at once.
 */
export function parseAllowedHosts(value: string | undefined): { entries: string[]; problems: string[] } {
  const entries: string[] = [];
  const problems: string[] = [];
  for (const raw of (value ?? '').split(',')) {
    const item = raw.trim();
    if (item === '') continue;
    const entry = normaliseEntry(item);
    if (entry === undefined) {
      problems.push(`"${item}" is not a host name, *.suffix, IP address or CIDR (no scheme, port or path)`);
    } else {
      entries.push(entry);
    }
  }
  return { entries, problems };
}

function normaliseEntry(item: string): string | undefined {
  const slash = item.indexOf('/');
  if (slash >= 0) {
    const address = bareAddress(item.slice(0, slash)).toLowerCase();
    const prefix = item.slice(slash + 1);
    const type = family(address);
    if (!type || !/^\d{1,3}$/.test(prefix) || Number(prefix) > (type === 'ipv4' ? 32 : 128)) return undefined;
    return `${address}/${Number(prefix)}`;
  }
  const address = bareAddress(item).toLowerCase();
  const type = family(address);
  if (type) return `${address}/${type === 'ipv4' ? 32 : 128}`;
  if (item.startsWith('*.')) {
    const suffix = hostName(item.slice(2));
    return suffix === undefined ? undefined : `*.${suffix}`;
  }
  return hostName(item);
}

/** A delivery the policy stopped before any byte was sent; the job is not retried for it. */
export class CallbackHostRefused extends Error {
  readonly code = 'ERR_CALLBACK_HOST_REFUSED';
  constructor(reason: string) {
    super(`callback refused: ${reason}`);
    this.name = 'CallbackHostRefused';
  }
}

/** dns.lookup's shape with `all: true`; injectable so tests can make a name resolve anywhere. */
export type Resolver = (hostname: string, options: LookupAllOptions, callback: (err: NodeJS.ErrnoException | null, addresses: LookupAddress[]) => void) => void;

const defaultResolver: Resolver = (hostname, options, callback) => dnsLookup(hostname, options, callback);

export class CallbackPolicy {
  /** No list: any public host. */
  readonly open: boolean;
  private readonly names = new Set<string>();
  /** `.example.com` for `*.example.com`: any depth of subdomain, not the apex itself. */
  private readonly suffixes: string[] = [];
  private readonly cidrs = new BlockList();

  /** `entries` as parseAllowedHosts returns them (config has validated them). */
  constructor(
    entries: readonly string[],
    private readonly resolver: Resolver = defaultResolver,
  ) {
    this.open = entries.length === 0;
    for (const item of entries) {
      const entry = normaliseEntry(item);
      if (entry === undefined) throw new Error(`invalid callback host entry "${item}"`);
      const slash = entry.indexOf('/');
      if (slash >= 0) {
        const address = entry.slice(0, slash);
        this.cidrs.addSubnet(address, Number(entry.slice(slash + 1)), family(address));
      } else if (entry.startsWith('*.')) {
        this.suffixes.push(entry.slice(1));
      } else {
        this.names.add(entry);
      }
    }
  }

  /**
   * Why a URL host (`URL#hostname`, IPv6 bracketed or not) may not receive callbacks, in words
   * fit for the submitter; undefined when it may. Says nothing about where a name resolves.
   */
  refusal(hostname: string): string | undefined {
    const address = bareAddress(hostname).toLowerCase();
    const type = family(address);
    if (type) {
      if (this.cidrs.check(address, type)) return undefined;
      if (!this.open) return `${address} is not in ${LIST}`;
      const cls = classifyAddress(address);
      return cls === 'public' || cls === undefined ? undefined : `${address} is ${LABELS[cls]} address; ${OPEN_RULE}`;
    }
    const name = normaliseName(hostname);
    if (this.open) return isInternalName(name) ? `${name} is not a public host name; ${OPEN_RULE}` : undefined;
    return this.nameListed(name) ? undefined : `${name} is not in ${LIST}`;
  }

  /** May a delivery to `hostname` connect to `address`, one of the addresses it resolved to? */
  allowsAddress(hostname: string, address: string): boolean {
    const bare = bareAddress(address);
    const type = family(bare);
    if (!type) return false;
    if (this.cidrs.check(bare, type)) return true;
    const name = normaliseName(hostname);
    // A host the operator named exactly is trusted wherever it resolves: that is how an internal
    // receiver is allowed by name. A *.suffix entry is not: anyone with a subdomain could point it inward.
    if (this.names.has(name)) return true;
    return classifyAddress(bare) === 'public' && (this.open || this.suffixMatch(name));
  }

  /**
   * For net/tls `connect({ lookup })`: resolves, keeps only the addresses this host may reach,
   * and fails with CallbackHostRefused when none is left, so the socket never opens.
   */
  readonly lookup: LookupFunction = (hostname: string, options: LookupOptions, callback) => {
    this.resolver(hostname, { ...options, all: true }, (err, addresses) => {
      if (err) {
        callback(err, options.all ? [] : '');
        return;
      }
      const allowed = addresses.filter((entry) => this.allowsAddress(hostname, entry.address));
      const [first] = allowed;
      if (!first) {
        const refused = new CallbackHostRefused(`${normaliseName(hostname)} resolves only to addresses callbacks may not reach`);
        callback(refused, options.all ? [] : '');
        return;
      }
      if (options.all) callback(null, allowed);
      else callback(null, first.address, first.family);
    });
  };

  private nameListed(name: string): boolean {
    return this.names.has(name) || this.suffixMatch(name);
  }

  private suffixMatch(name: string): boolean {
    return this.suffixes.some((suffix) => name.endsWith(suffix));
  }
}

const LIST = "the gateway's JOBS_CALLBACK_ALLOWED_HOSTS";
const OPEN_RULE = "callbacks go only to public hosts unless the gateway's JOBS_CALLBACK_ALLOWED_HOSTS allows them";

function normaliseName(hostname: string): string {
  return hostname.toLowerCase().replace(/\.$/, '');
}
