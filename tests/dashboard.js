// Loads fmsflow's dashboard in Debian's headless Chromium (driven by playwright-core), checks
// that its charts and panels render with data and that it updates, and saves a screenshot.
//   node tests/dashboard.js <dashboard URL> <screenshot.png>
// Needs NODE_PATH to hold playwright-core and FMSFLOW_CHROMIUM the browser (scripts/test
// sets both). Prints one JSON line of what it saw; exits non-zero on the first failed check.
"use strict";
const { chromium } = require("playwright-core");

const [url, shot] = process.argv.slice(2);
const exe = process.env.FMSFLOW_CHROMIUM || "/usr/bin/chromium";

function fail(msg) {
  console.error("dashboard check failed: " + msg);
  process.exit(1);
}

(async () => {
  const browser = await chromium.launch({
    executablePath: exe,
    headless: true,
    // The machines are offline: no background connections, no component updates.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1300 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  await page.goto(url, { waitUntil: "load", timeout: 30000 });

  // Data arrived: a poll went through, and every metric's chart drew points.
  await page.waitForFunction(() => {
    const charts = [...document.querySelectorAll("canvas[id^=chart-]")];
    return Number(document.body.dataset.updates) >= 1 && charts.length === 6 &&
      charts.every((c) => Number(c.dataset.points) > 0);
  }, null, { timeout: 60000 }).catch(() => fail("the charts never got data"));

  const first = await page.evaluate(() => ({
    updates: Number(document.body.dataset.updates),
    epoch: Number(document.body.dataset.epoch),
    points: Number(document.querySelector("#chart-sensor1").dataset.points),
  }));
  // Live: later polls show a later epoch.
  await page.waitForFunction((e) => Number(document.body.dataset.epoch) > e &&
      Number(document.body.dataset.updates) >= 3, first.epoch, { timeout: 60000 })
    .catch(() => fail("the dashboard did not update (epoch stayed at " + first.epoch + ")"));

  const seen = await page.evaluate(() => {
    // Pixels the charts drew in the accent's blue (the mean line, the band and the hours'
    // bars), not the grey labels or the dark background.
    let drawn = 0;
    for (const c of document.querySelectorAll("canvas[id^=chart-]")) {
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      for (let i = 0; i < d.length; i += 4) if (d[i + 2] - d[i] > 40) drawn++;
    }
    return {
      updates: Number(document.body.dataset.updates),
      epoch: Number(document.body.dataset.epoch),
      reporting: document.querySelector("#reporting").textContent,
      quality: document.querySelector("#quality").textContent,
      rate: document.querySelector("#rate").textContent,
      rules: [...document.querySelectorAll("#rules .rule")].map((r) => r.dataset.rule),
      fleetRows: document.querySelectorAll("#fleet tbody tr").length,
      points: Number(document.querySelector("#chart-sensor1").dataset.points),
      drawn,
      error: document.querySelector("#error").hidden ? null : document.querySelector("#error").textContent,
    };
  });
  await page.screenshot({ path: shot, fullPage: true });
  await browser.close();
  console.log(JSON.stringify({ first, seen, errors }));
  if (errors.length) fail("the page logged errors: " + errors.join("; "));
  if (seen.error) fail("the page shows an error: " + seen.error);
  if (!/^\d+ \/ \d+$/.test(seen.reporting) || seen.reporting.startsWith("0 ")) fail("devices reporting: " + seen.reporting);
  if (!/%$/.test(seen.quality)) fail("quality: " + seen.quality);
  if (!/\/s$/.test(seen.rate)) fail("ingest rate: " + seen.rate);
  if (!seen.rules.includes("valid")) fail("quality by rule: " + seen.rules);
  if (seen.fleetRows === 0) fail("the fleet table is empty");
  if (seen.drawn < 6 * 300) fail("the charts drew almost nothing (" + seen.drawn + " pixels)");
})().catch((e) => fail(String(e && e.stack || e)));
