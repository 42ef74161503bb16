// Debian's headless Chromium ($CHROMIUM or /usr/bin/chromium), as every
// browser test here launches it: no sandbox (root in CI), nothing fetched
// from the network behind the page's back.
import { chromium } from "playwright-core";

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
}
