// A new customer, from nothing to a paid, working key, in headless Chromium:
// asks for a sign-in link, follows it (from the mail a local SMTP sink took:
// one JSON line per message) and confirms, creates a key, tops up through the
// (stand-in) Stripe checkout, spends with the key, and signs out. Prints one
// JSON line of what it saw for tests/dashboard.rs.
//   node signup.mjs <base url> <email> <mail file> [screenshot.png]
import { readFileSync } from "node:fs";
import { launch } from "./browser.mjs";

const [base, email, mail, screenshot] = process.argv.slice(2);
const browser = await launch();
const seen = {};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function linkFromMail() {
  for (let i = 0; i < 100; i++) {
    let text = "";
    try { text = readFileSync(mail, "utf8"); } catch {}
    const message = text.split("\n").filter(Boolean).map((l) => JSON.parse(l)).find((m) => m.to.includes(email));
    if (message) return message.body.split(/\s/).find((w) => w.startsWith("http"));
    await sleep(50);
  }
  throw new Error("no sign-in mail");
}
const balance = async (page) => {
  await page.waitForFunction(() => document.getElementById("balance").textContent !== "–");
  return Number(await page.textContent("#balance"));
};

try {
  const page = await browser.newPage({ viewport: { width: 1040, height: 1500 } });
  await page.goto(`${base}/dashboard`);
  await page.fill("#email", email);
  await page.click("#send-link");
  await page.waitForFunction(() => document.getElementById("email-note").textContent !== "");
  seen.note = await page.textContent("#email-note");

  await page.goto(await linkFromMail());
  await Promise.all([page.waitForURL((u) => u.pathname === "/dashboard"), page.click("#confirm")]);
  seen.landed = new URL(page.url()).pathname;
  seen.start_balance = await balance(page);
  seen.account = await page.textContent("#account-name");
  seen.key_in_storage = await page.evaluate(() => sessionStorage.length);

  await page.click("#create-key");
  await page.waitForFunction(() => document.getElementById("new-key").textContent.startsWith("sk-fal-"));
  const key = await page.textContent("#new-key");

  await page.fill("#topup-usd", "5");
  await Promise.all([page.waitForURL((u) => !u.href.startsWith(base)), page.click("#topup")]);
  await Promise.all([page.waitForURL((u) => u.href.startsWith(base)), page.click("#pay")]);
  seen.paid_balance = await balance(page);

  seen.proxied = await fetch(`${base}/fal-ai/flux/dev`, {
    method: "POST",
    headers: { "x-api-key": key, "content-type": "application/json" },
    body: JSON.stringify({ prompt: "a red fox", image_size: "square_hd" }),
  }).then((r) => r.status);
  // The charge reaches the chart once the ledger has written it.
  for (let i = 0; i < 50; i++) {
    await page.goto(`${base}/dashboard`);
    await balance(page);
    if (Number(await page.getAttribute("#chart", "data-bars")) > 0) break;
    await sleep(100);
  }
  seen.bars = Number(await page.getAttribute("#chart", "data-bars"));
  seen.final_balance = await balance(page);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

  await page.click("#sign-out");
  await page.waitForFunction(() => !document.getElementById("sign-in-view").hidden);
  seen.after_sign_out = await page.evaluate(() => fetch("/v1/account").then((r) => r.status));
  seen.ok = true;
} catch (e) {
  seen.ok = false;
  seen.error = String(e);
}
await browser.close();
console.log(JSON.stringify(seen));
