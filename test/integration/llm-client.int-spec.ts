import { OpenAiSdkLlmClient } from '../../src/upstream/openai-sdk-llm-client.js';
import { llmClientContract } from '../../src/upstream/testing/llm-client.contract.js';
import { UndiciLlmClient } from '../../src/upstream/undici-llm-client.js';

// Both upstream drivers against the stub upstream on loopback (PERFORMANCE.md: one contract suite).
llmClientContract('undici', (options) => new UndiciLlmClient({ ...options, connections: options.connections ?? 4 }));
llmClientContract('sdk', (options) => new OpenAiSdkLlmClient(options));
