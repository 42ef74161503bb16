// Tops up in headless Chromium as a user does: signs in to the dashboard,
// asks for a top-up, pays on the (stand-in) Stripe checkout page, and comes
// back to the dashboard. Prints one JSON line of what it saw for
// tests/dashboard.rs.
//   node topup.mjs <base url> <key> <usd> [screenshot.png]
import { launch } from "./browser.mjs";

const [base, key, usd, screenshot] = process.argv.slice(2);
const browser = await launch();
const seen = {};
try {
  const page = await browser.newPage({ viewport: { width: 1040, height: 1400 } });
  await page.goto(`${base}/dashboard`);
  await page.fill("#key", key);
  await page.click("#sign-in");
  await page.waitForFunction(() => document.getElementById("balance").textContent !== "–");
  seen.before = Number(await page.textContent("#balance"));
  seen.offered = await page.isVisible("#topup-card");

  await page.fill("#topup-usd", usd);
  await Promise.all([page.waitForURL((u) => !u.href.startsWith(base)), page.click("#topup")]);
  seen.checkout_amount = await page.textContent("#amount");
  await Promise.all([page.waitForURL((u) => u.href.startsWith(base)), page.click("#pay")]);
  seen.returned_to = page.url();
  await page.waitForFunction(() => document.getElementById("balance").textContent !== "–");
  seen.after = Number(await page.textContent("#balance"));
  seen.note = await page.textContent("#topup-note");
  await page.waitForFunction(() => document.querySelectorAll("#payments tr").length > 0);
  seen.payments = await page.locator("#payments tr").count();
  seen.payment_row = await page.textContent("#payments tr");
  seen.receipt = await page.getAttribute("#payments a.receipt", "href");
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  seen.ok = true;
} catch (e) {
  seen.ok = false;
  seen.error = String(e);
}
await browser.close();
console.log(JSON.stringify(seen));
