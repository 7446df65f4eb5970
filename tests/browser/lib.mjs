// What the browser scripts share: their settings from the environment,
// expectations, RFC 6238 codes, and Debian's chromium started and stopped
// around a script's body (the exit status tells the Rust test the outcome).
import { chromium } from "playwright-core";
import { createHmac } from "node:crypto";

export function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

export function expect(ok, what) {
  if (!ok) throw new Error(`expected: ${what}`);
  console.log(`ok: ${what}`);
}

// RFC 6238 (SHA-1, 30 s, 6 digits), for time step `step` (the current one
// unless given).
export function totp(secret, step = Math.floor(Date.now() / 1000 / 30)) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = "";
  for (const c of secret.replace(/=+$/, "").toUpperCase()) bits += alphabet.indexOf(c).toString(2).padStart(5, "0");
  const key = Buffer.from(bits.match(/.{8}/g).map((b) => parseInt(b, 2)));
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(step));
  const mac = createHmac("sha1", key).update(counter).digest();
  const offset = mac[mac.length - 1] & 0xf;
  const code = (mac.readUInt32BE(offset) & 0x7fffffff) % 1_000_000;
  return String(code).padStart(6, "0");
}

// Runs `body(browser)` in a headless chromium, then exits: 0 when it
// finished, 1 (with the error printed) when it threw.
export async function inChromium(body) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  let failed = false;
  try {
    await body(browser);
  } catch (err) {
    failed = true;
    console.error(err);
  } finally {
    await browser.close();
  }
  process.exit(failed ? 1 : 0);
}
