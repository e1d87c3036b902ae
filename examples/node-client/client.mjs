// A specdec client from the public contract alone: protos/specdec/v1/generation.proto and API.md.
// Usage: node client.mjs [ADDRESS]   (default 127.0.0.1:50051)
// Prints the greedy tokens with speculation on and off, and the status code of each bad input from API.md.
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const definition = protoLoader.loadSync("specdec/v1/generation.proto", {
  includeDirs: [path.join(here, "..", "..", "protos")],
  keepCase: true, // field names exactly as in the .proto (max_new_tokens, not maxNewTokens)
  longs: Number,
  enums: String,
  defaults: true,
});
const { Generation } = grpc.loadPackageDefinition(definition).specdec.v1;
const client = new Generation(process.argv[2] ?? "127.0.0.1:50051", grpc.credentials.createInsecure());

function generate(request) {
  return new Promise((resolve, reject) => {
    const tokens = [];
    let text = "";
    let last = null;
    const call = client.Generate(request);
    call.on("data", (msg) => {
      tokens.push(...msg.token_ids);
      text += msg.text;
      last = msg;
    });
    call.on("error", reject);
    call.on("end", () => resolve({ tokens, text, finish: last?.finish_reason, usage: last?.usage }));
  });
}

const chat = { messages: [{ role: "user", content: "What causes the seasons on Earth?" }] };
const on = await generate({ chat, sampling: { max_new_tokens: 48 }, speculation: { max_draft_tokens: 5 } });
const off = await generate({ chat, sampling: { max_new_tokens: 48 }, speculation: { max_draft_tokens: 0 } });
console.log("speculation on :", JSON.stringify(on.text));
console.log("speculation off:", JSON.stringify(off.text));
console.log("same tokens:", JSON.stringify(on.tokens) === JSON.stringify(off.tokens), "finish:", on.finish, off.finish);
console.log("usage on:", JSON.stringify(on.usage));

const bad = {
  "no input": { sampling: { max_new_tokens: 4 } },
  "empty prompt": { prompt: "", sampling: { max_new_tokens: 4 } },
  "max_new_tokens 0": { prompt: "hi", sampling: { max_new_tokens: 0 } },
  "max_new_tokens over limit": { prompt: "hi", sampling: { max_new_tokens: 100000 } },
  "temperature < 0": { prompt: "hi", sampling: { max_new_tokens: 4, temperature: -1 } },
  "temperature NaN": { prompt: "hi", sampling: { max_new_tokens: 4, temperature: NaN } },
  "top_p outside [0, 1]": { prompt: "hi", sampling: { max_new_tokens: 4, top_p: 2 } },
  "token ids outside vocabulary": { tokens: { ids: [1, 99999999] }, sampling: { max_new_tokens: 4 } },
  "prompt longer than context": { tokens: { ids: Array(9000).fill(42) }, sampling: { max_new_tokens: 4 } },
};
for (const [name, request] of Object.entries(bad)) {
  try {
    await generate(request);
    console.log(`${name}: accepted (unexpected)`);
  } catch (err) {
    console.log(`${name}: ${grpc.status[err.code]} - ${err.details}`);
  }
}
const after = await generate({ prompt: "Hello", sampling: { max_new_tokens: 3 } });
console.log("still serving:", after.tokens.length, "tokens");
client.close();
