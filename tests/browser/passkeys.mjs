// Passkeys in a real browser: Debian's chromium with virtual authenticators
// (the DevTools WebAuthn domain), driven by playwright-core. The page is
// Plinth's API reference (its origin is the relying party's), and the
// ceremonies run through navigator.credentials exactly as a web app's
// would. Run by tests/passkeys.rs, which prepares the accounts and checks
// the database afterwards. Exits non-zero on the first failed expectation.
//
//   BASE_URL (http://localhost:<port>), OTHER_URL (a second instance),
//   PASSWORD (every account's),
//   ALICE_EMAIL, ALICE_TOKEN, BOB_TOKEN (another organization's member),
//   DAVE_TOKEN (of an organization that requires single sign-on)
import { env, expect, inChromium, totp } from "./lib.mjs";

const base = env("BASE_URL");
const other = env("OTHER_URL");
const password = env("PASSWORD");
const aliceEmail = env("ALICE_EMAIL");
const alice = env("ALICE_TOKEN");
const bob = env("BOB_TOKEN");
const dave = env("DAVE_TOKEN");

const show = (res) => `${res.status} ${JSON.stringify(res.body)}`;

await inChromium(async (browser) => {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  page.on("requestfailed", (r) => console.error(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  page.on("console", (m) => console.error(`console: ${m.text()}`));
  // The API reference page: its policy lets scripts call the API (connect-src
  // 'self'), as a web app served from the same origin would.
  await page.goto(`${base}/docs`);
  expect(await page.evaluate(() => window.isSecureContext && !!window.PublicKeyCredential), "the page can use WebAuthn");

  const cdp = await context.newCDPSession(page);
  await cdp.send("WebAuthn.enable", { enableUI: false });
  // A platform authenticator with a PIN or biometric: what a laptop or
  // phone has. Each device is one; only one is attached at a time.
  let attached = null;
  async function attach(credentials = []) {
    if (attached) await cdp.send("WebAuthn.removeVirtualAuthenticator", { authenticatorId: attached });
    const { authenticatorId } = await cdp.send("WebAuthn.addVirtualAuthenticator", {
      options: {
        protocol: "ctap2",
        transport: "internal",
        hasResidentKey: true,
        hasUserVerification: true,
        isUserVerified: true,
        automaticPresenceSimulation: true,
      },
    });
    for (const credential of credentials) await cdp.send("WebAuthn.addCredential", { authenticatorId, credential });
    attached = authenticatorId;
  }
  const held = async () => (await cdp.send("WebAuthn.getCredentials", { authenticatorId: attached })).credentials;

  // The API, called from the page as a web app calls it.
  const callOn = (page, method, path, { token, body } = {}) =>
    page.evaluate(
      async ({ method, path, token, body }) => {
        const headers = { "content-type": "application/json" };
        if (token) headers.authorization = `Bearer ${token}`;
        const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
        const text = await res.text();
        return { status: res.status, body: text ? JSON.parse(text) : null };
      },
      { method, path, token, body },
    );
  const call = (method, path, options) => callOn(page, method, path, options);
  const create = (options) =>
    page.evaluate(async (options) => {
      try {
        const made = await navigator.credentials.create({ publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(options) });
        return { credential: made.toJSON() };
      } catch (err) {
        return { error: err.name };
      }
    }, options);
  const get = (options) =>
    page.evaluate(async (options) => {
      const got = await navigator.credentials.get({ publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(options) });
      return got.toJSON();
    }, options);

  async function register(token, name) {
    const started = await call("POST", "/v1/me/passkey-options", { token, body: { password } });
    expect(started.status === 200, `registration options for ${name} (${show(started)})`);
    const made = await create(started.body.options);
    expect(!made.error, `the authenticator made ${name} (${made.error})`);
    const res = await call("POST", "/v1/me/passkeys", { token, body: { name, credential: made.credential } });
    expect(res.status === 201 && res.body.name === name, `${name} is registered (${show(res)})`);
    return res.body;
  }
  async function signIn() {
    const started = await call("POST", "/v1/auth/passkey/options");
    expect(started.status === 200, `sign-in options (${show(started)})`);
    const credential = await get(started.body.options);
    return { res: await call("POST", "/v1/auth/passkey", { body: { credential } }), credential };
  }
  const names = async (token) => (await call("GET", "/v1/me/passkeys", { token })).body.data.map((p) => p.name);

  // Alice registers her laptop's passkey; the password is asked again.
  await attach();
  const wrong = await call("POST", "/v1/me/passkey-options", { token: alice, body: { password: "not the password at all" } });
  expect(wrong.status === 401 && wrong.body.error.code === "invalid_credentials", `a wrong password starts nothing (${show(wrong)})`);
  const laptop = await register(alice, "laptop");
  // The same device does not hold a second one of hers.
  const again = await call("POST", "/v1/me/passkey-options", { token: alice, body: { password } });
  expect(again.body.options.excludeCredentials.length === 1, "registration options exclude her passkey");
  expect((await create(again.body.options)).error === "InvalidStateError", "the laptop refuses a second passkey of hers");
  const laptopKeys = await held();

  // Her phone: another device, another passkey.
  await attach();
  const phone = await register(alice, "phone");
  const phoneKeys = await held();
  expect(JSON.stringify(await names(alice)) === JSON.stringify(["laptop", "phone"]), "both are listed by name");

  // Signing in with the phone alone.
  let { res, credential } = await signIn();
  expect(res.status === 200 && res.body.user.email === aliceEmail, `the phone signs Alice in (${show(res)})`);
  const me = await call("GET", "/v1/me", { token: res.body.token });
  expect(me.status === 200 && me.body.user.email === aliceEmail, "the new session is hers");
  const replayed = await call("POST", "/v1/auth/passkey", { body: { credential } });
  expect(replayed.status === 401 && replayed.body.error.code === "invalid_credentials", `a replayed answer is refused (${show(replayed)})`);

  // And with the laptop, finishing on the other instance (from a page of
  // its own) what this one began.
  await attach(laptopKeys);
  const begun = await call("POST", "/v1/auth/passkey/options");
  credential = await get(begun.body.options);
  const otherPage = await context.newPage();
  await otherPage.goto(`${other}/docs`);
  res = await callOn(otherPage, "POST", "/v1/auth/passkey", { body: { credential } });
  await otherPage.close();
  expect(res.status === 200 && res.body.user.email === aliceEmail, `the laptop signs Alice in on the other instance (${show(res)})`);

  // Two-factor sign-in: TOTP on; a passkey stands in for the code.
  const enrolled = await call("POST", "/v1/auth/totp/enroll", { token: alice, body: { password } });
  expect(enrolled.status === 200, `TOTP enrolment (${show(enrolled)})`);
  const confirmed = await call("POST", "/v1/auth/totp/confirm", {
    token: alice,
    body: { code: totp(enrolled.body.secret), password },
  });
  expect(confirmed.status === 200 && confirmed.body.totp_enabled, `TOTP is on (${show(confirmed)})`);
  const login = (extra = {}) => call("POST", "/v1/auth/login", { body: { email: aliceEmail, password, ...extra } });
  const second = await login();
  expect(second.status === 401 && second.body.error.code === "totp_required", `the password alone is not enough (${show(second)})`);
  const offered = second.body.error.passkey;
  expect(offered && offered.allowCredentials.length === 2, "the error offers a ceremony for her two passkeys");
  const answer = await get(offered);
  const withPasskey = await login({ passkey: answer });
  expect(withPasskey.status === 200 && withPasskey.body.user.email === aliceEmail, `password and passkey sign in (${show(withPasskey)})`);
  // Turning TOTP on ended the earlier sessions: this one is checked by the test.
  console.log(`SESSION ${withPasskey.body.token}`);
  const replayedSecond = await login({ passkey: answer });
  expect(replayedSecond.status === 401 && replayedSecond.body.error.code === "invalid_credentials", `a replayed second factor is refused (${show(replayedSecond)})`);
  // A passkey answer to the sign-in-alone ceremony is not a second factor.
  const alone = await call("POST", "/v1/auth/passkey/options");
  const wrongCeremony = await login({ passkey: await get(alone.body.options) });
  expect(wrongCeremony.status === 401, `an answer to another ceremony is refused (${show(wrongCeremony)})`);

  // Renamed, removed; a removed passkey signs in no more.
  const renamed = await call("PATCH", `/v1/me/passkeys/${laptop.id}`, { token: alice, body: { name: "work laptop" } });
  expect(renamed.status === 200 && renamed.body.name === "work laptop", `renamed (${show(renamed)})`);
  const blank = await call("PATCH", `/v1/me/passkeys/${laptop.id}`, { token: alice, body: { name: "  " } });
  expect(blank.status === 400, `a blank name is refused (${show(blank)})`);
  const removed = await call("DELETE", `/v1/me/passkeys/${phone.id}`, { token: alice });
  expect(removed.status === 204, `the phone's passkey is removed (${show(removed)})`);
  expect(JSON.stringify(await names(alice)) === JSON.stringify(["work laptop"]), "one is left");
  await attach(phoneKeys);
  ({ res } = await signIn());
  expect(res.status === 401 && res.body.error.code === "invalid_credentials", `the removed passkey signs in no more (${show(res)})`);

  // Bob, of another organization, neither sees nor touches them.
  expect((await names(bob)).length === 0, "Bob lists none of Alice's passkeys");
  const bobRename = await call("PATCH", `/v1/me/passkeys/${laptop.id}`, { token: bob, body: { name: "mine" } });
  expect(bobRename.status === 404, `Bob cannot rename hers (${show(bobRename)})`);
  const bobRemove = await call("DELETE", `/v1/me/passkeys/${laptop.id}`, { token: bob });
  expect(bobRemove.status === 404, `Bob cannot remove hers (${show(bobRemove)})`);
  expect(JSON.stringify(await names(alice)) === JSON.stringify(["work laptop"]), "hers is still there");

  // Dave's organization requires single sign-on: his passkey does not go
  // around it.
  await attach();
  await register(dave, "dave's key");
  ({ res } = await signIn());
  expect(res.status === 403 && res.body.error.code === "sso_required", `single sign-on stays required (${show(res)})`);
  await context.close();
});
