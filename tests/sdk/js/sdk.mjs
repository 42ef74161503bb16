// fal's JavaScript SDK, unmodified, pointed at AbhiAPI the way a user would:
// `proxyUrl` plus our key as `credentials`. Prints one JSON line for tests/sdk.rs.
//   node sdk.mjs <proxy url> <key> run|subscribe|upload
import { fal } from "@fal-ai/client";

const [proxyUrl, key, scenario] = process.argv.slice(2);
fal.config({ credentials: key, proxyUrl: { url: proxyUrl, when: "always" } });

const input = { prompt: "a red fox", image_size: "square_hd" };
const scenarios = {
  run: async () => {
    const { data, requestId } = await fal.run("fal-ai/flux/dev", { input });
    return { data, requestId };
  },
  subscribe: async () => {
    const { data, requestId } = await fal.subscribe("fal-ai/flux/dev", { input, pollInterval: 50 });
    return { data, requestId };
  },
  upload: async () => {
    const url = await fal.storage.upload(new Blob(["hello from the sdk"], { type: "text/plain" }));
    return { url };
  },
};

try {
  console.log(JSON.stringify({ ok: true, ...(await scenarios[scenario]()) }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, name: e.name, status: e.status, body: e.body, message: e.message }));
}
