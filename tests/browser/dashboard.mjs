// Signs in to the dashboard in headless Chromium (Debian's, at $CHROMIUM or
// /usr/bin/chromium) and does what a user does there. Prints one JSON line
// of what it saw for tests/dashboard.rs.
//   node dashboard.mjs <base url> <key> [screenshot.png]
import { launch } from "./browser.mjs";

const [base, key, screenshot] = process.argv.slice(2);
const browser = await launch();
const seen = {};
const proxied = (k) =>
  fetch(`${base}/fal-ai/flux/dev`, {
    method: "POST",
    headers: { "x-api-key": k, "content-type": "application/json" },
    body: JSON.stringify({ prompt: "a red fox", image_size: "square_hd" }),
  }).then((r) => r.status);

try {
  const page = await browser.newPage({ viewport: { width: 1040, height: 1300 } });
  await page.goto(`${base}/dashboard`);
  await page.fill("#key", key);
  await page.click("#sign-in");
  await page.waitForFunction(() => document.getElementById("balance").textContent !== "–");
  seen.balance = Number(await page.textContent("#balance"));
  seen.account = await page.textContent("#account-name");
  seen.stored = await page.evaluate(() => [sessionStorage.length, localStorage.length]);

  await page.waitForFunction(() => Number(document.getElementById("chart").dataset.bars) > 0);
  seen.bars = Number(await page.getAttribute("#chart", "data-bars"));
  seen.painted = await page.evaluate(() => {
    const c = document.getElementById("chart");
    const pixels = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) n++;
    return n;
  });
  seen.charges = await page.locator("#charges tr").count();
  seen.legend = await page.textContent("#legend");

  await page.click("#create-key");
  await page.waitForFunction(() => document.getElementById("new-key").textContent.startsWith("sk-fal-"));
  const created = await page.textContent("#new-key");
  seen.created_shape = /^sk-fal-[0-9A-Za-z]{32}$/.test(created);
  seen.created_status = await proxied(created);

  const prefix = created.slice(0, 11);
  const row = page.locator("#keys tr", { hasText: prefix });
  await row.locator("button.revoke").click();
  await page.waitForFunction(
    (p) => [...document.querySelectorAll("#keys tr")].some(
      (r) => r.textContent.includes(p) && r.querySelector(".state").textContent === "disabled"),
    prefix,
  );
  seen.revoked_status = await proxied(created);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  seen.ok = true;
} catch (e) {
  seen.ok = false;
  seen.error = String(e);
}
await browser.close();
console.log(JSON.stringify(seen));
