// fal's own proxy package as its README sets it up on express, the peer
// (d) of benches/load.sh. Its documented `allowedUrlPatterns` option lets
// it reach the loopback mock fal; nothing else is changed.
//   node server.mjs <mock port>   (prints "listening <port>")
import express from "express";
import { createHandler, route } from "@fal-ai/server-proxy/express";

const mockPort = process.argv[2];
// The package warns on every start about open endpoints; the bench does not care.
console.warn = () => {};
const app = express();
app.use(express.json());
app.all(
  route,
  createHandler({
    allowedUrlPatterns: [`127.0.0.1:${mockPort}/**`],
    allowedEndpoints: ["mock/canned"],
    resolveFalAuth: async () => "Key bench:bench",
  }),
);
const server = app.listen(0, "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
