// The operator console in a real browser: Debian's chromium, driven by
// playwright-core. Run by tests/console_browser.rs, which prepares the
// server and its data and passes them in the environment; it checks the
// database afterwards. Exits non-zero on the first failed expectation.
//
//   CONSOLE_URL, OPERATOR_EMAIL, OPERATOR_PASSWORD, TOTP_SECRET,
//   TENANT_SLUG (the tenant to act on), MEMBER_EMAIL (to impersonate),
//   PARKED_EVENT, DEAD_JOB, SHOTS (the folder for screenshots)
import { mkdirSync } from "node:fs";
import path from "node:path";
import { env, expect, inChromium, totp } from "./lib.mjs";

const base = env("CONSOLE_URL");
const shots = env("SHOTS");
mkdirSync(shots, { recursive: true });

// Accessibility basics on the page as it stands: every visible field has a
// label, every button and link a name.
async function accessible(page, name) {
  const problems = await page.evaluate(() => {
    const out = [];
    const visible = (el) => el.type !== "hidden" && el.getClientRects().length > 0;
    for (const el of document.querySelectorAll("input, select, textarea")) {
      if (!visible(el)) continue;
      const labelled = (el.labels && el.labels.length > 0) || el.getAttribute("aria-label");
      if (!labelled) out.push(`field ${el.name || el.id} has no label`);
    }
    for (const el of document.querySelectorAll("button, a[href]")) {
      const name = (el.getAttribute("aria-label") || el.textContent || "").trim();
      if (!name) out.push(`${el.tagName} without a name`);
    }
    if (!document.querySelector("h1")) out.push("no h1");
    if (!document.documentElement.lang) out.push("no lang");
    return out;
  });
  expect(problems.length === 0, `${name}: labels and names (${problems.join("; ")})`);
}

async function shot(page, name) {
  await accessible(page, name);
  const file = path.join(shots, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot: ${file}`);
}

// Presses Tab until `locator` has the focus (at most 80 times): the control
// is reachable from the keyboard alone.
async function tabTo(page, locator, what) {
  const target = await locator.elementHandle();
  for (let i = 0; i < 80; i++) {
    await page.keyboard.press("Tab");
    if (await target.evaluate((el) => el === document.activeElement)) {
      console.log(`ok: ${what} reached with ${i + 1} Tab presses`);
      return;
    }
  }
  throw new Error(`expected: ${what} reachable by keyboard`);
}

// Tabs to a button and presses Enter: the action is usable without a mouse.
async function byKeyboard(page, locator, what) {
  await tabTo(page, locator, what);
  await page.keyboard.press("Enter");
}

await inChromium(async (browser) => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const dialogs = [];
  page.on("dialog", async (dialog) => {
    dialogs.push(dialog.message());
    await dialog.accept();
  });
  page.setDefaultTimeout(30_000);

  // Sign in: password first, then the one-time code it asks for.
  await page.goto(`${base}/console/login`);
  await shot(page, "01-sign-in");
  await page.getByLabel("Email address").fill(env("OPERATOR_EMAIL"));
  await page.getByLabel("Password").fill(env("OPERATOR_PASSWORD"));
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("Enter the code from your authenticator app.").waitFor();
  await page.getByLabel("Password").fill(env("OPERATOR_PASSWORD"));
  const step = Math.floor(Date.now() / 1000 / 30) + 1;
  await page.getByLabel(/One-time code/).fill(totp(env("TOTP_SECRET"), step));
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Tenants" }).waitFor();
  expect(new URL(page.url()).pathname === "/console/", "signed in to the tenant list");
  await shot(page, "02-tenants");

  // Find the tenant.
  const slug = env("TENANT_SLUG");
  await page.getByLabel("Slug or name").fill(slug);
  await page.getByLabel("Slug or name").press("Enter");
  await page.getByText("1 tenant.").waitFor();
  await page.getByRole("link", { name: slug, exact: true }).click();
  await page.getByRole("heading", { name: /Actions/ }).waitFor();
  await shot(page, "03-tenant");

  // Suspend (with the mouse), reactivate (with the keyboard alone; the
  // focus starts from the top of the page).
  await page.getByRole("button", { name: "Suspend" }).click();
  await page.getByText("The tenant is suspended.").waitFor();
  expect(dialogs.at(-1).startsWith(`Suspend ${slug}?`), "suspending asked for confirmation");
  await byKeyboard(page, page.getByRole("button", { name: "Reactivate" }), "Reactivate");
  await page.getByText("The tenant is served again.").waitFor();
  expect(dialogs.at(-1).startsWith(`Serve ${slug} again?`), "reactivating asked for confirmation");

  // Change the plan, with the keyboard too: Tab to the list, type the
  // plan's first letter, Tab on to the button, Enter.
  const plan = page.getByLabel("Plan", { exact: true });
  await page.locator("body").focus();
  await tabTo(page, plan, "the plan list");
  await page.keyboard.type("e");
  expect((await plan.inputValue()) === "enterprise", "the keyboard chose enterprise");
  await byKeyboard(page, page.getByRole("button", { name: "Change plan" }), "Change plan");
  await page.getByText("The plan is changed.").waitFor();
  expect((await page.locator(".facts").textContent()).includes("enterprise"), "the page shows the new plan");

  // Impersonate a member, with a reason; the banner data comes from
  // GET /v1/me with the impersonation session, in this browser.
  const member = env("MEMBER_EMAIL");
  const options = await page.getByLabel("Member", { exact: true }).locator("option").allTextContents();
  const choice = options.find((o) => o.startsWith(member));
  expect(Boolean(choice), `the member ${member} is offered`);
  await page.getByLabel("Member", { exact: true }).selectOption({ label: choice });
  await page.getByLabel(/Reason/).fill("ticket 4711: the export button does nothing");
  await page.getByRole("button", { name: "Impersonate" }).click();
  await page.locator("#banner[data-loaded]").waitFor();
  expect((await page.locator("#banner-header").textContent()) === "true", "answers carry plinth-impersonation: true");
  expect((await page.locator("#banner-user").textContent()) === member, "acting as the member");
  expect((await page.locator("#banner-operator").textContent()) === env("OPERATOR_EMAIL"), "the banner names the operator");
  expect((await page.locator("#banner-reason").textContent()) === "ticket 4711: the export button does nothing", "the banner gives the reason");
  await shot(page, "04-impersonation");

  // Replay the parked webhook.
  const event = env("PARKED_EVENT");
  await page.getByRole("link", { name: "Stripe inbox" }).click();
  await page.getByRole("link", { name: /^parked: / }).click();
  await page.getByText(event).waitFor();
  await shot(page, "05-stripe-inbox");
  await page.getByRole("button", { name: `Replay ${event}` }).click();
  await page.getByText("The event was processed again").waitFor();
  const row = page.locator("tr", { hasText: event });
  expect((await row.locator(".badge").textContent()) === "processed", "the replayed event is processed");

  // Retry the dead job.
  const job = env("DEAD_JOB");
  await page.getByRole("link", { name: "Jobs", exact: true }).click();
  await page.getByText(job).waitFor();
  const jobRow = await page.locator("tr", { hasText: job }).textContent();
  expect(jobRow.includes("1 tenant(s) failed: broken-co"), `the dead job shows its error (${jobRow.replace(/\s+/g, " ").trim()})`);
  await shot(page, "06-jobs");
  await page.getByRole("button", { name: `Retry job ${job}` }).click();
  await page.getByText("The job is queued again.").waitFor();

  // Migrations: once the retried run is done, nobody is behind; another
  // run shows its progress live and finishes.
  await page.getByRole("link", { name: "Migrations" }).click();
  // The retried run is the latest: the page follows it live until done.
  await page.getByText(/ 0 behind\./).waitFor({ timeout: 60_000 });
  await page.getByRole("button", { name: "Run migrate-all" }).click();
  await page.getByText("Migrate-all is queued").waitFor();
  await page.locator("#progress .badge", { hasText: "done" }).waitFor({ timeout: 60_000 });
  await shot(page, "07-migrations");

  // Mail, platform admins, the operator log.
  await page.getByRole("link", { name: "Mail" }).click();
  await page.getByRole("heading", { name: "Mail" }).waitFor();
  expect((await page.locator("tbody tr").count()) > 0, "mail deliveries are listed");
  await shot(page, "08-mail");
  await page.getByRole("link", { name: "Platform admins" }).click();
  expect((await page.locator("tr", { hasText: env("OPERATOR_EMAIL") }).textContent()).includes("yes"), "the operator's second factor shows");
  await shot(page, "09-admins");
  await page.getByRole("link", { name: "Operator log" }).click();
  const log = await page.locator("tbody").textContent();
  for (const action of ["tenant.suspended", "tenant.reactivated", "tenant.plan_changed", "impersonation.started", "stripe.event_replayed", "job.retried", "migrations.started", "console.signed_in"]) {
    expect(log.includes(action), `the operator log has ${action}`);
  }
  await shot(page, "10-operator-log");
  await context.close();
});
