export {
  STUB_DEFAULT_PRICE,
  STUB_PRICES,
  parseStubConfig,
  startStubUpstream,
  stubCost,
  stubPrice,
} from './stub-upstream.js';
export type {
  StubConfig,
  StubFaults,
  StubPrice,
  StubRequestRecord,
  StubScript,
  StubUpstream,
  StubUpstreamOptions,
} from './stub-upstream.js';
