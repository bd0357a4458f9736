// Drives the console in Debian's headless Chromium (playwright-core), as
// pgrx-tests/tests/console_browser.rs sets it up: the goals it made are in
// CONSOLE_TEST (JSON). Prints what it measured as JSON; exits 1 with the first
// thing that did not happen.
import { chromium } from "playwright-core";

const test = JSON.parse(process.env.CONSOLE_TEST);
const WAIT = { timeout: 30_000 };

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  // Without the background-networking flags Chromium keeps trying to reach
  // the internet; the console needs nothing from it.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const measured = {};
const problems = [];
try {
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    // The refused signal below answers 409 on purpose; Chromium logs every such answer.
    if (message.type() === "error" && !message.text().includes("status of 409")) {
      problems.push(`console error: ${message.text()}`);
    }
  });
  page.on("dialog", (dialog) => dialog.accept());
  const open = async (hash) => {
    await page.evaluate((h) => { window.location.hash = h; }, hash);
  };

  // The list: every goal, newest first, each a link.
  await page.goto(test.url);
  await page.waitForSelector(`#goals tr[data-goal-id="${test.branch}"]`, WAIT);
  const listed = await page.$$eval("#goals tr[data-goal-id]", (rows) => rows.map((r) => Number(r.dataset.goalId)));
  check(JSON.stringify(listed) === JSON.stringify([...listed].sort((a, b) => b - a)), `the list is not newest first: ${listed}`);
  for (const id of test.all) check(listed.includes(id), `goal ${id} is not listed: ${listed}`);
  await page.waitForSelector("#counts button[data-status=running]", WAIT);
  // Nothing is reloaded from here on: the page must follow the goals by itself.
  await page.evaluate(() => { window.stillTheSamePage = true; });

  // A goal: every step and every edge condition drawn.
  await page.click(`#goals tr[data-goal-id="${test.branch}"] a`);
  for (const step of test.branchSteps) {
    await page.waitForSelector(`#dag svg g.node[data-step="${step}"]`, WAIT);
  }
  const labels = await page.$$eval("#dag svg .edge-label", (texts) => texts.map((t) => t.textContent));
  for (const condition of test.branchConditions) {
    check(labels.includes(condition), `edge condition ${condition} is not drawn: ${JSON.stringify(labels)}`);
  }
  await page.waitForSelector('#dag g.node.status-waiting[data-step="approve"]', WAIT);

  // A signal releases the waiting step; the plan shows the branch it chose.
  await page.fill("#signal-form [name=name]", "approval");
  await page.fill("#signal-form [name=payload]", '{"approved": true}');
  await page.click("#signal-form [type=submit]");
  await page.waitForSelector('#dag g.edge.edge-taken[data-to="pay"]', WAIT);
  await page.waitForSelector('#dag g.edge.edge-not_taken[data-to="reject"]', WAIT);
  await page.waitForSelector('#dag g.node.status-succeeded[data-step="pay"]', WAIT);
  await page.waitForSelector('#dag g.node.status-skipped[data-step="reject"]', WAIT);
  await page.waitForSelector("#goal-status.status-succeeded", WAIT);
  const resultText = await page.textContent("#action-result");
  check(/taken/.test(resultText), `the signal's outcome is not shown: ${resultText}`);
  await page.screenshot({ path: test.screenshot, fullPage: false });

  // A refused action shows its error.
  await page.fill("#signal-form [name=name]", "late");
  await page.fill("#signal-form [name=payload]", "{}");
  await page.click("#signal-form [type=submit]");
  await page.waitForFunction(() => /55000/.test(document.querySelector("#action-error")?.textContent ?? ""), null, WAIT);

  // Cancel: the status changes in place.
  await open(`#/goals/${test.waiting}`);
  await page.waitForSelector("#goal-status.status-running", WAIT);
  await page.click("#cancel");
  await page.waitForSelector("#goal-status.status-cancelled", WAIT);
  await page.waitForSelector('#dag g.node.status-cancelled[data-step="hold"]', WAIT);

  // A map of a thousand instances and a child goal.
  const started = Date.now();
  await open(`#/goals/${test.map}`);
  await page.waitForSelector('#dag g.node.map[data-step="each"]', WAIT);
  await page.waitForSelector("#dag g.node[data-child-goal]", WAIT);
  await page.waitForSelector('#tasks tr[data-step="each"]', WAIT);
  measured.map_page_ms = Date.now() - started;
  const mapText = await page.textContent('#dag g.node.map[data-step="each"]');
  check(mapText.includes("1000/1000"), `the map's counts are not drawn: ${mapText}`);
  await page.click('#tasks tr[data-step="each"] button.toggle-instances');
  await page.waitForSelector('#tasks tr.instance[data-step="each"][data-index="499"]', WAIT);
  // The child goal, and back to its parent.
  await page.click("#tasks a.child-goal");
  await page.waitForSelector("#parent-goal", WAIT);
  const parentLink = await page.getAttribute("#parent-goal", "href");
  check(parentLink === `#/goals/${test.map}`, `the child goal links to ${parentLink}`);

  // Hostile text from the goal stays text.
  await open(`#/goals/${test.hostile}`);
  await page.waitForSelector('#tasks tr[data-step="evil"]', WAIT);
  await page.waitForSelector("#goal-status.status-failed", WAIT);
  const shown = await page.textContent("#view");
  for (const text of test.hostileTexts) check(shown.includes(text), `not shown as text: ${text}`);
  const injected = await page.evaluate(() => ({
    pwned: window.pwned ?? null,
    images: document.querySelectorAll("#view img").length,
    scripts: document.querySelectorAll("#view script").length,
  }));
  check(injected.pwned === null && injected.images === 0 && injected.scripts === 0,
    `hostile text became markup: ${JSON.stringify(injected)}`);
  await open("#/");
  await page.waitForSelector(`#goals tr[data-goal-id="${test.hostile}"]`, WAIT);
  check(await page.evaluate(() => window.pwned ?? null) === null, "the list ran hostile text");

  // The system page.
  await open("#/system");
  await page.waitForSelector("#workers", WAIT);
  await page.waitForSelector("#actions-catalogue td code", WAIT);
  // A submitter's console may not read the templates: it says so in their place.
  await page.waitForSelector("#templates .not-shown", WAIT);
  const workers = await page.textContent("#workers");
  check(workers.includes("noop"), `the workers' actions are not listed: ${workers}`);
  check(await page.evaluate(() => window.stillTheSamePage === true), "the page was reloaded");

  // A console behind a token: the link with it opens the page, a guess does not.
  const guarded = await browser.newPage();
  const refused = await guarded.goto(`${test.tokenUrl}?token=wrong`);
  check(refused.status() === 401, `a wrong token got ${refused.status()}`);
  await guarded.goto(`${test.tokenUrl}?token=${test.token}`);
  check(!guarded.url().includes("token="), `the token stays in the address: ${guarded.url()}`);
  await guarded.waitForSelector(`#goals tr[data-goal-id="${test.branch}"]`, WAIT);
} catch (error) {
  problems.push(error.message);
} finally {
  await browser.close();
}
console.log(JSON.stringify({ measured, problems }));
process.exit(problems.length ? 1 : 0);
