import { type DynamicModule, Inject, Module, type OnApplicationShutdown } from '@nestjs/common';
import type { StubUpstream } from '../../libs/stub-upstream/src/index.js';
import type { AppConfig } from '../config/config.js';
import { AppLogger } from '../core/logger.js';
import { LlmClient, UpstreamInfo } from './llm-client.js';
import { UndiciLlmClient } from './undici-llm-client.js';

const UPSTREAM_RUNTIME = Symbol('UPSTREAM_RUNTIME');

interface UpstreamRuntime {
  client: LlmClient;
  info: UpstreamInfo;
  mockServer: StubUpstream | undefined;
}

/**
 * Without OPENROUTER_API_KEY the gateway starts the project's stub upstream in this process on
 * a loopback port and talks to it through the configured driver, so the mock exercises the very
 * same code path as production, and every response says `x-gateway-upstream: mock`.
 */
async function createRuntime(config: AppConfig, logger: AppLogger['logger']): Promise<UpstreamRuntime> {
  let mockServer: StubUpstream | undefined;
  let baseUrl = config.upstream.baseUrl;
  let apiKey = config.upstream.apiKey;
  if (config.upstream.mock) {
    // Imported only when used, like the SDK driver below: a module loaded is memory kept for the
    // life of the process (docs/operations.md "Memory").
    const { startStubUpstream } = await import('../../libs/stub-upstream/src/index.js');
    // knownModelsOnly: a model id OpenRouter would refuse (a typo) is refused here too, so the
    // newcomer's demo does not answer and bill what production will answer 400 model_not_found.
    mockServer = await startStubUpstream({ host: '127.0.0.1', port: 0, recordRequests: false, knownModelsOnly: true });
    baseUrl = mockServer.url;
    apiKey = 'mock-upstream-no-key';
    logger.warn(
      { context: 'Upstream', upstream: 'mock' },
      'OPENROUTER_API_KEY is not set: answers come from the BUILT-IN MOCK UPSTREAM, not a real model (x-gateway-upstream: mock)',
    );
  }
  const extraHeaders = { 'HTTP-Referer': config.upstream.referer, 'X-Title': config.upstream.title };
  const common = { baseUrl, apiKey: apiKey ?? '', timeoutMs: config.upstream.timeoutMs, extraHeaders };
  let client: LlmClient;
  switch (config.upstream.driver) {
    case 'undici':
      client = new UndiciLlmClient({ ...common, connections: config.upstream.connections });
      break;
    case 'sdk': {
      // The openai package alone is ~3.5 MB of live heap; the default driver never needs it.
      const { OpenAiSdkLlmClient } = await import('./openai-sdk-llm-client.js');
      client = new OpenAiSdkLlmClient(common);
      break;
    }
  }
  return { client, info: { mock: config.upstream.mock, baseUrl: config.upstream.mock ? 'mock' : baseUrl }, mockServer };
}

class UpstreamLifecycle implements OnApplicationShutdown {
  constructor(@Inject(UPSTREAM_RUNTIME) private readonly runtime: UpstreamRuntime) {}
  async onApplicationShutdown(): Promise<void> {
    await this.runtime.client.close();
    await this.runtime.mockServer?.close();
  }
}

@Module({})
export class UpstreamModule {
  static forRoot(config: AppConfig): DynamicModule {
    return {
      module: UpstreamModule,
      global: true,
      providers: [
        { provide: UPSTREAM_RUNTIME, useFactory: (appLogger: AppLogger) => createRuntime(config, appLogger.logger), inject: [AppLogger] },
        { provide: LlmClient, useFactory: (r: UpstreamRuntime) => r.client, inject: [UPSTREAM_RUNTIME] },
        { provide: UpstreamInfo, useFactory: (r: UpstreamRuntime) => r.info, inject: [UPSTREAM_RUNTIME] },
        UpstreamLifecycle,
      ],
      exports: [LlmClient, UpstreamInfo],
    };
  }
}
