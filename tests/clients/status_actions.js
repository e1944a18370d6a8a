#!/usr/bin/env node
// The status page's actions in a real browser: headless Chromium (Debian's)
// driven by puppeteer-core. Prints one JSON line: what the page said.
//
//   status_actions.js --url http://127.0.0.1:PORT --token T --mode click
//       --action actions/check --field account=x@y [--field op=drop ...]
//   status_actions.js ... --mode callback --account x@y
//       (Reconnect; the provider's sign-in sends the browser back to the callback)
//   status_actions.js ... --mode paste --account x@y --landing https://idp/nativeclient
//       (Reconnect; the sign-in link is opened in a second tab, the address it
//        ends on, under --landing, is pasted into the form)
'use strict';
const puppeteer = require('puppeteer-core');

function args() {
  const a = { field: [] };
  const v = process.argv.slice(2);
  for (let i = 0; i < v.length; i += 2) {
    const k = v[i].replace(/^--/, '');
    if (k === 'field') a.field.push(v[i + 1]); else a[k] = v[i + 1];
  }
  return a;
}

// The form posting to `action` whose hidden fields have these values.
function formSelector(action, fields) {
  const has = fields.map((f) => {
    const [name, value] = f.split(/=(.*)/s);
    return `:has(input[name="${name}"][value="${value}"])`;
  }).join('');
  return `form[action="${action}"]${has}`;
}

async function submit(page, selector) {
  const form = await page.$(selector);
  if (!form) throw new Error(`no form ${selector} on the page`);
  const button = await form.$('button');
  const label = (await button.evaluate((b) => b.textContent)).trim();
  const [response] = await Promise.all([page.waitForNavigation({ waitUntil: 'load', timeout: 60000 }), button.click()]);
  return { label, status: response ? response.status() : 0 };
}

async function result(page) {
  const h1 = await page.$('#result');
  if (!h1) return { result: null, body: (await page.content()).slice(0, 2000) };
  return {
    result: (await h1.evaluate((e) => e.textContent)).trim(),
    ok: await h1.evaluate((e) => e.classList.contains('ok')),
    lines: await page.evaluate(() => (document.querySelector('pre') || { textContent: '' }).textContent),
  };
}

(async () => {
  const a = args();
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const out = {};
  try {
    const page = await browser.newPage();
    await page.authenticate({ username: 'admin', password: a.token });
    const first = await page.goto(a.url + '/', { waitUntil: 'load' });
    out.page_status = first.status();
    if (a.mode === 'click') {
      Object.assign(out, await submit(page, formSelector(a.action, a.field)));
    } else {
      Object.assign(out, await submit(page, formSelector('actions/connect', [`account=${a.account}`])));
      if (a.mode === 'paste') {
        const href = await page.$eval('#sign-in', (e) => e.href);
        const signin = await browser.newPage();
        await signin.setRequestInterception(true);
        let landed = null;
        signin.on('request', (r) => {
          if (r.url().startsWith(a.landing)) { landed = r.url(); r.abort(); } else r.continue();
        });
        await signin.goto(href, { waitUntil: 'load' }).catch(() => {});
        if (!landed) throw new Error('the sign-in did not end under ' + a.landing);
        await signin.close();
        await page.type('textarea[name="address"]', landed);
        const [response] = await Promise.all([
          page.waitForNavigation({ waitUntil: 'load', timeout: 60000 }),
          page.click('button[type="submit"]'),
        ]);
        out.status = response ? response.status() : 0;
      }
    }
    Object.assign(out, await result(page));
    out.path = new URL(page.url()).pathname;
  } catch (e) {
    out.error = String(e && e.message || e);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})();
