import type { LookupAddress } from 'node:dns';
import { describe, expect, it } from 'vitest';
import { type AddressClass, CallbackHostRefused, CallbackPolicy, classifyAddress, parseAllowedHosts, type Resolver } from './callback-policy.js';

const hostOf = (url: string) => new URL(url).hostname;

describe('address classification', () => {
  it.each<[string, AddressClass]>([
    ['0.0.0.0', 'unspecified'],
    ['0.1.2.3', 'unspecified'],
    ['10.0.0.1', 'private'],
    ['10.255.255.255', 'private'],
    ['172.16.0.1', 'private'],
    ['172.31.255.255', 'private'],
    ['192.168.1.1', 'private'],
    ['100.64.0.1', 'cgnat'],
    ['100.127.255.255', 'cgnat'],
    ['127.0.0.1', 'loopback'],
    ['127.255.255.254', 'loopback'],
    ['169.254.169.254', 'link-local'],
    ['224.0.0.1', 'multicast'],
    ['239.255.255.250', 'multicast'],
    ['255.255.255.255', 'reserved'],
    ['240.0.0.1', 'reserved'],
    ['192.0.2.10', 'reserved'],
    ['198.18.0.1', 'reserved'],
    ['::', 'unspecified'],
    ['::1', 'loopback'],
    ['[::1]', 'loopback'],
    ['fc00::1', 'unique-local'],
    ['fd12:3456::1', 'unique-local'],
    ['fe80::1', 'link-local'],
    ['fe80::1%eth0', 'link-local'],
    ['ff02::1', 'multicast'],
    ['2001:db8::1', 'reserved'],
    ['::7f00:1', 'reserved'],
    // IPv4-mapped, NAT64 and 6to4 forms are judged by the IPv4 address they reach.
    ['::ffff:127.0.0.1', 'loopback'],
    ['::ffff:7f00:1', 'loopback'],
    ['::ffff:a9fe:a9fe', 'link-local'],
    ['::ffff:10.1.2.3', 'private'],
    ['::ffff:0.0.0.0', 'unspecified'],
    ['64:ff9b::a9fe:a9fe', 'link-local'],
    ['2002:7f00:1::', 'loopback'],
    ['2002:c0a8:101::1', 'private'],
  ])('%s is %s', (address, cls) => {
    expect(classifyAddress(address)).toBe(cls);
  });

  it.each([
    '8.8.8.8',
    '1.1.1.1',
    '9.255.255.255',
    '11.0.0.0',
    '100.63.255.255',
    '100.128.0.0',
    '172.15.255.255',
    '172.32.0.0',
    '192.167.255.255',
    '223.255.255.255',
    '2606:4700::1111',
    '2001:4860:4860::8888',
    '::ffff:8.8.8.8',
    '64:ff9b::808:808',
    '2002:808:808::1',
  ])('%s is public', (address) => {
    expect(classifyAddress(address)).toBe('public');
  });

  it('is undefined for names', () => {
    expect(classifyAddress('example.com')).toBeUndefined();
    expect(classifyAddress('localhost')).toBeUndefined();
  });
});

describe('JOBS_CALLBACK_ALLOWED_HOSTS entries', () => {
  it('normalises names, wildcards, addresses and CIDRs, skipping empty items', () => {
    expect(parseAllowedHosts(' Hooks.Internal. , *.Example.COM,,127.0.0.1/32, 10.0.0.0/8 ,[::1], FD00::/8, 192.168.1.5, bücher.example')).toEqual({
      entries: ['hooks.internal', '*.example.com', '127.0.0.1/32', '10.0.0.0/8', '::1/128', 'fd00::/8', '192.168.1.5/32', 'xn--bcher-kva.example'],
      problems: [],
    });
    expect(parseAllowedHosts(undefined)).toEqual({ entries: [], problems: [] });
    expect(parseAllowedHosts(' , ')).toEqual({ entries: [], problems: [] });
  });

  it('names every entry that is not a host, *.suffix, address or CIDR', () => {
    const bad = [
      'https://hooks.example.com',
      'hooks.example.com:443',
      'hooks.example.com/path',
      '10.0.0.0/33',
      'fd00::/129',
      '10.0.0.0/x',
      '*',
      '*.',
      'a.*.example.com',
      '1.2.3',
      'under score.example',
    ];
    const { entries, problems } = parseAllowedHosts(['ok.example', ...bad].join(','));
    expect(entries).toEqual(['ok.example']);
    expect(problems).toHaveLength(bad.length);
    bad.forEach((item, i) => expect(problems[i]).toContain(`"${item}"`));
  });
});

describe('callback policy at submit (the URL host)', () => {
  const open = new CallbackPolicy([]);

  it('allows any public host by default', () => {
    for (const url of ['https://hooks.example.com/x?token=1', 'http://8.8.8.8/', 'http://[2606:4700::1111]:8443/', 'https://a.b.example.co.uk./']) {
      expect(open.refusal(hostOf(url)), url).toBeUndefined();
    }
  });

  it('refuses internal addresses in every form WHATWG URL normalises to them, saying what they are', () => {
    const cases: Array<[string, string]> = [
      ['http://169.254.169.254/latest/meta-data/', '169.254.169.254 is a link-local address'],
      ['http://127.0.0.1:8080/', '127.0.0.1 is a loopback address'],
      ['http://2130706433/', '127.0.0.1 is a loopback address'],
      ['http://0x7f.1/', '127.0.0.1 is a loopback address'],
      ['http://0177.0.0.1/', '127.0.0.1 is a loopback address'],
      ['http://127.1/', '127.0.0.1 is a loopback address'],
      ['http://127.0.0.1./', '127.0.0.1 is a loopback address'],
      ['http://0/', '0.0.0.0 is an unspecified address'],
      ['http://10.1.2.3/', '10.1.2.3 is a private address'],
      ['http://100.100.100.200/', '100.100.100.200 is a shared (CGNAT) address'],
      ['http://[::1]/', '::1 is a loopback address'],
      ['http://[0:0:0:0:0:0:0:1]/', '::1 is a loopback address'],
      ['http://[::]/', ':: is an unspecified address'],
      ['http://[::ffff:127.0.0.1]/', '::ffff:7f00:1 is a loopback address'],
      ['http://[::ffff:169.254.169.254]/', '::ffff:a9fe:a9fe is a link-local address'],
      ['http://[fd00:ec2::254]/', 'fd00:ec2::254 is a unique-local address'],
      ['http://[fe80::1]/', 'fe80::1 is a link-local address'],
      ['http://224.0.0.1/', '224.0.0.1 is a multicast address'],
    ];
    for (const [url, reason] of cases) {
      const refusal = open.refusal(hostOf(url));
      expect(refusal, url).toContain(reason);
      expect(refusal, url).toContain('JOBS_CALLBACK_ALLOWED_HOSTS');
    }
  });

  it('refuses names that never mean a public host', () => {
    for (const url of [
      'http://localhost:3000/',
      'http://LOCALHOST./',
      'http://api.localhost/',
      'http://printer.local/',
      'http://metadata.google.internal/',
      'http://router.home.arpa/',
      'http://redis:6379/',
      'http://localhost.localdomain/',
    ]) {
      expect(open.refusal(hostOf(url)), url).toContain('is not a public host name');
    }
  });

  it('with a list, allows only what it names: exact names, subdomains of *.suffix, addresses in a CIDR', () => {
    const policy = new CallbackPolicy(['hooks.internal', '*.example.com', '127.0.0.1/32', 'fd00::/8']);
    for (const url of [
      'http://hooks.internal/',
      'http://HOOKS.internal./',
      'https://a.example.com/',
      'https://a.b.example.com/',
      'http://127.0.0.1:9000/',
      'http://[::ffff:127.0.0.1]/',
      'http://[fd00::5]/',
    ]) {
      expect(policy.refusal(hostOf(url)), url).toBeUndefined();
    }
    for (const url of [
      'https://example.com/',
      'https://badexample.com/',
      'https://example.com.evil.test/',
      'http://localhost/',
      'http://127.0.0.2/',
      'http://8.8.8.8/',
      'http://other.internal/',
      'http://[::1]/',
    ]) {
      const refusal = policy.refusal(hostOf(url));
      expect(refusal, url).toContain("is not in the gateway's JOBS_CALLBACK_ALLOWED_HOSTS");
    }
  });
});

describe('callback policy at delivery (the resolved addresses)', () => {
  it('by default lets a name reach public addresses only', () => {
    const open = new CallbackPolicy([]);
    expect(open.allowsAddress('hooks.example.com', '93.184.216.34')).toBe(true);
    expect(open.allowsAddress('hooks.example.com', '2606:2800:220:1::1')).toBe(true);
    for (const address of ['127.0.0.1', '::1', '10.0.0.5', '169.254.169.254', '::ffff:127.0.0.1', 'fd00::1', '0.0.0.0', 'not-an-ip']) {
      expect(open.allowsAddress('hooks.example.com', address), address).toBe(false);
    }
  });

  it('trusts the DNS of an exactly named host, but not of a *.suffix match unless a CIDR covers the address', () => {
    const policy = new CallbackPolicy(['hooks.internal', '*.example.com']);
    expect(policy.allowsAddress('hooks.internal', '10.0.0.5')).toBe(true);
    expect(policy.allowsAddress('a.example.com', '93.184.216.34')).toBe(true);
    expect(policy.allowsAddress('a.example.com', '10.0.0.5')).toBe(false);
    expect(policy.allowsAddress('a.example.com', '127.0.0.1')).toBe(false);
    expect(policy.allowsAddress('unlisted.test', '93.184.216.34')).toBe(false);
    const withRange = new CallbackPolicy(['*.example.com', '10.0.0.0/8']);
    expect(withRange.allowsAddress('a.example.com', '10.0.0.5')).toBe(true);
    expect(withRange.allowsAddress('a.example.com', '::ffff:10.0.0.5')).toBe(true);
    expect(withRange.allowsAddress('a.example.com', '11.0.0.5')).toBe(true);
    expect(withRange.allowsAddress('a.example.com', '192.168.0.5')).toBe(false);
  });

  const resolverOf =
    (answers: Record<string, LookupAddress[]>, calls: string[] = []): Resolver =>
    (hostname, _options, callback) => {
      calls.push(hostname);
      const addresses = answers[hostname];
      if (addresses) callback(null, addresses);
      else callback(Object.assign(new Error(`getaddrinfo ENOTFOUND ${hostname}`), { code: 'ENOTFOUND' }), []);
    };

  const lookup = (policy: CallbackPolicy, hostname: string, all: boolean) =>
    new Promise<{ err: NodeJS.ErrnoException | null; address: unknown; family: unknown }>((resolve) => {
      policy.lookup(hostname, { all }, (err, address, family) => resolve({ err, address, family }));
    });

  it('refuses a name that resolves to loopback (DNS rebinding) with CallbackHostRefused', async () => {
    const calls: string[] = [];
    const policy = new CallbackPolicy(
      [],
      resolverOf(
        {
          'rebind.example.test': [
            { address: '127.0.0.1', family: 4 },
            { address: '::1', family: 6 },
          ],
        },
        calls,
      ),
    );
    for (const all of [true, false]) {
      const { err } = await lookup(policy, 'rebind.example.test', all);
      expect(err).toBeInstanceOf(CallbackHostRefused);
      expect(err?.message).toContain('rebind.example.test resolves only to addresses callbacks may not reach');
    }
    expect(calls).toEqual(['rebind.example.test', 'rebind.example.test']);
  });

  it('hands on only the allowed addresses of a mixed answer, in the shape net asked for', async () => {
    const policy = new CallbackPolicy(
      [],
      resolverOf({
        'mixed.example.test': [
          { address: '10.0.0.1', family: 4 },
          { address: '93.184.216.34', family: 4 },
          { address: '2606:2800:220:1::1', family: 6 },
        ],
      }),
    );
    expect(await lookup(policy, 'mixed.example.test', true)).toEqual({
      err: null,
      address: [
        { address: '93.184.216.34', family: 4 },
        { address: '2606:2800:220:1::1', family: 6 },
      ],
      family: undefined,
    });
    expect(await lookup(policy, 'mixed.example.test', false)).toEqual({ err: null, address: '93.184.216.34', family: 4 });
  });

  it('passes resolver failures through unchanged', async () => {
    const { err } = await lookup(new CallbackPolicy([], resolverOf({})), 'nowhere.example.test', true);
    expect(err).not.toBeInstanceOf(CallbackHostRefused);
    expect(err?.code).toBe('ENOTFOUND');
  });
});
