// The driver's app: sign in with a phone code, then everything over the /api/v1/me API.
// Tokens live in this tab's sessionStorage (they survive a trip to the payment page).
"use strict";
(() => {
  const t = JSON.parse(document.getElementById("texts").textContent);
  const $ = (id) => document.getElementById(id);
  const zh = document.documentElement.lang.startsWith("zh");
  const yuan = (fen) => `¥${Math.floor(fen / 100)}.${String(fen % 100).padStart(2, "0")}`;
  const when = (iso) => (iso ? new Date(iso).toLocaleString(zh ? "zh-CN" : "en-GB", {
    timeZone: $("app").dataset.tz, hour12: false, year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit",
  }) : "—");
  // As the pay page and the messages write it (billing.notifications.format_duration).
  const duration = (minutes) => {
    const hours = Math.floor(minutes / 60);
    if (!zh) return `${hours}h${String(minutes % 60).padStart(2, "0")}m`;
    return hours ? `${hours}小时${minutes % 60}分` : `${minutes}分钟`;
  };
  const frameUrls = [];

  function h(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  }

  const tokens = {
    get access() { return sessionStorage.getItem("app-access"); },
    get refresh() { return sessionStorage.getItem("app-refresh"); },
    keep(pair) {
      sessionStorage.setItem("app-access", pair.access_token);
      sessionStorage.setItem("app-refresh", pair.refresh_token);
    },
    clear() {
      sessionStorage.removeItem("app-access");
      sessionStorage.removeItem("app-refresh");
    },
  };

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.code = error.code || "";
    }
  }

  async function refreshTokens() {
    const response = await fetch("/api/v1/auth/token", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ grant_type: "refresh_token", refresh_token: tokens.refresh }),
    });
    if (!response.ok) return false;
    tokens.keep(await response.json());
    return true;
  }

  async function call(path, { method = "GET", json, raw = false, retry = true } = {}) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${tokens.access}` };
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    const response = await fetch(path, { method, headers, body, cache: "no-store" });
    if (response.status === 401 && retry && tokens.refresh && (await refreshTokens())) {
      return call(path, { method, json, raw, retry: false });
    }
    if (response.status === 401) {
      signedOut();
      throw new ApiError(401, null);
    }
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    if (raw) return response;
    return response.status === 204 ? null : response.json();
  }

  function notice(message) {
    $("notice").textContent = message || "";
    $("notice").hidden = !message;
  }

  const reason = (error) => t[`err_${error.code}`] || error.message;
  const failed = (error) => notice(`${t.error}${reason(error)}`);

  // ---- signing in -----------------------------------------------------------------------

  let challenge = null;

  $("code-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const phone = $("phone").value.trim();
    $("sign-in-status").textContent = "";
    try {
      const response = await fetch("/api/v1/auth/sign-in-codes", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ phone }),
      });
      const body = await response.json().catch(() => null);
      if (!response.ok) throw new ApiError(response.status, body);
      // The code goes to /token with this request's challenge (its tries are this code's alone).
      challenge = { phone, id: body.challenge_id };
      $("token-form").hidden = false;
      $("sign-in-status").textContent = t.code_sent;
      $("code").focus();
    } catch (error) {
      $("sign-in-status").textContent = `${t.error}${reason(error)}`;
    }
  });

  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const response = await fetch("/api/v1/auth/token", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          grant_type: "sign_in_code", phone: challenge?.phone, code: $("code").value.trim(),
          challenge_id: challenge?.id,
        }),
      });
      const body = await response.json().catch(() => null);
      if (!response.ok) throw new ApiError(response.status, body);
      tokens.keep(body);
      signedIn();
    } catch (error) {
      $("sign-in-status").textContent = `${t.error}${reason(error)}`;
    }
  });

  function signedIn() {
    $("sign-in").hidden = true;
    $("home").hidden = false;
    $("app").dataset.state = "signed-in";
    show("plates");
  }

  function signedOut() {
    tokens.clear();
    $("home").hidden = true;
    $("sign-in").hidden = false;
    $("token-form").hidden = true;
    $("app").dataset.state = "signed-out";
  }

  $("sign-out").addEventListener("click", async () => {
    const refresh = tokens.refresh;
    signedOut();
    await fetch("/api/v1/auth/sign-out", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ refresh_token: refresh }),
    }).catch(() => undefined);
  });

  // ---- tabs -----------------------------------------------------------------------------

  const loaders = {
    plates: loadPlates, stays: loadStays, debts: loadDebts, messages: loadMessages,
    account: loadAccount,
  };

  function show(tab) {
    notice("");
    for (const button of document.querySelectorAll("nav.tabs button")) {
      if (button.dataset.tab === tab) button.setAttribute("aria-current", "page");
      else button.removeAttribute("aria-current");
    }
    for (const view of document.querySelectorAll("[data-view]")) view.hidden = view.dataset.view !== tab;
    loaders[tab]().catch(failed);
  }

  for (const button of document.querySelectorAll("nav.tabs button")) {
    button.addEventListener("click", () => show(button.dataset.tab));
  }

  // ---- plates ---------------------------------------------------------------------------

  async function loadPlates() {
    const me = await call("/api/v1/me");
    const list = $("plates");
    list.replaceChildren(...me.plates.map((binding) => h(
      "li", { "data-plate": binding.plate },
      h("strong", { text: binding.plate }), " ",
      h("span", { class: "badge", text: t[`color_${binding.color}`] || binding.color }), " ",
      ...(binding.disputed ? [h("span", { class: "badge warn", text: t.disputed })] : []),
      " ",
      h("button", {
        type: "button", text: t.unbind, "aria-label": `${t.unbind} ${binding.plate}`,
        onclick: async () => {
          try {
            await call(`/api/v1/me/plates/${binding.id}`, { method: "DELETE" });
            await loadPlates();
          } catch (error) { failed(error); }
        },
      }),
      // The provider's word on the plate's pay-later service, when it stops the car.
      ...(binding.service_note && binding.service_state !== "normal"
        ? [h("div", { class: "note", "data-service": binding.service_state || "unknown",
                      text: binding.service_note })]
        : []),
    )));
    if (!me.plates.length) list.append(h("li", { class: "note", text: t.no_plates }));
    $("claims").replaceChildren(...me.plate_claims.map((claim) => h(
      "li", { "data-claim": claim.id },
      `${t.claims}: `, h("strong", { text: claim.plate }), " ",
      h("span", { class: "badge", text: t[`color_${claim.color}`] || claim.color }), " ",
      h("span", { class: "badge warn", text: t[`claim_${claim.status}`] || claim.status }),
    )));
  }

  $("bind-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const status = $("bind-status");
    status.textContent = "";
    const claim = {
      plate: $("bind-plate").value.trim().toUpperCase(),
      color: $("bind-color").value,
      licence_no: $("bind-licence").value.trim(),
      owner_name: $("bind-owner").value.trim(),
    };
    try {
      await call("/api/v1/me/plates", { method: "POST", json: claim });
      status.textContent = t.bound;
      event.target.reset();
    } catch (error) {
      status.textContent = t[`err_${error.code}`] || `${t.error}${error.message}`;
    }
    await loadPlates().catch(failed);
  });

  // ---- stays and receipts ---------------------------------------------------------------

  async function loadStays() {
    $("stay").hidden = true;
    const page = await call("/api/v1/me/stays?limit=50");
    const list = $("stays");
    list.replaceChildren(...page.items.map((stay) => h(
      "li", {},
      h("button", {
        type: "button", class: "link", id: `stay-${stay.id}`,
        text: `${stay.car_park} · ${stay.plate}`, onclick: () => openStay(stay.id),
      }),
      h("div", { class: "note", text: `${when(stay.entered_at)} → ${
        stay.exited_at ? when(stay.exited_at) : t.inside}${
        stay.fee_fen == null ? "" : ` · ${yuan(stay.fee_fen)}`}` }),
    )));
    if (!page.items.length) list.append(h("li", { class: "note", text: t.no_stays }));
  }

  async function showFrame(img, stayId, which, kept) {
    img.hidden = false;
    const placeholder = img.parentElement.querySelector(".note");
    if (placeholder) placeholder.remove();
    if (kept) {
      try {
        const blob = await (await call(`/api/v1/me/stays/${stayId}/frames/${which}`, { raw: true })).blob();
        const url = URL.createObjectURL(blob);
        frameUrls.push(url);
        img.src = url;
        return;
      } catch (_) { /* shown as unavailable below */ }
    }
    img.hidden = true;
    img.removeAttribute("src");
    img.after(h("p", { class: "note", text: t.no_frame }));
  }

  function disputeText(dispute) {
    return dispute ? t[`dispute_${dispute.status}`] || dispute.status : "";
  }

  async function openStay(stayId) {
    frameUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
    const stay = await call(`/api/v1/me/stays/${stayId}`);
    const facts = [
      [t.car_park, stay.car_park], [t.plate, stay.plate], [t.entered, when(stay.entered_at)],
      [t.exited, stay.exited_at ? when(stay.exited_at) : t.inside],
      [t.duration, duration(stay.duration_minutes)],
      [t.fee, stay.fee_fen == null ? "—" : yuan(stay.fee_fen)],
    ];
    if (stay.charge) facts.push([t.charge, `${yuan(stay.charge.amount_fen)} ${t[`charge_${stay.charge.status}`] || stay.charge.status}`]);
    for (const refund of stay.refunds) facts.push([t.refunded, yuan(refund.amount_fen)]);
    $("stay-facts").replaceChildren(...facts.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]));
    $("stay").dataset.stay = String(stayId);
    $("stay").hidden = false;
    await Promise.all([
      showFrame($("stay-entry-frame"), stayId, "entry", stay.entry_frame),
      showFrame($("stay-exit-frame"), stayId, "exit", stay.exit_frame),
    ]);
    $("stay-dispute").textContent = disputeText(stay.dispute);
    // The server says whether there is something to dispute: a charge, or a debt still owed
    // (a missed stay's has no charge).
    $("not-my-car").hidden = !stay.disputable;
    $("not-my-car-note").hidden = !stay.disputable;
    $("stay").scrollIntoView();
  }

  $("not-my-car").addEventListener("click", async () => {
    const stayId = $("stay").dataset.stay;
    try {
      const dispute = await call(`/api/v1/me/stays/${stayId}/dispute`, { method: "POST" });
      $("stay-dispute").textContent = disputeText(dispute);
      $("not-my-car").hidden = true;
      $("not-my-car-note").hidden = true;
    } catch (error) { failed(error); }
  });
  $("stay-back").addEventListener("click", () => { $("stay").hidden = true; });

  // ---- debts ----------------------------------------------------------------------------

  async function loadDebts() {
    const owed = await call("/api/v1/me/debts");
    $("debts").replaceChildren(...owed.debts.map((debt) => h(
      "li", {}, h("strong", { text: yuan(debt.amount_fen) }), ` ${debt.car_park} · ${when(debt.entered_at)}`,
    )));
    if (!owed.debts.length) $("debts").append(h("li", { class: "note", text: t.no_debts }));
    $("debt-total").textContent = owed.total_fen ? `${t.debt_total} ${yuan(owed.total_fen)}` : "";
    $("pay-debts").hidden = !owed.total_fen;
    return owed;
  }

  $("pay-debts").addEventListener("click", async () => {
    try {
      const payment = await call("/api/v1/me/debts/payment", { method: "POST" });
      if (payment.pay_url) {
        $("debt-pay-link").href = payment.pay_url;
        $("debt-pay-link").hidden = false;
        window.open(payment.pay_url, "_blank", "noopener");
      }
      $("debt-status").textContent = t.paying;
      const until = Date.now() + 5 * 60 * 1000;
      const poll = async () => {
        const owed = await loadDebts().catch(() => null);
        if (owed && !owed.total_fen) {
          $("debt-status").textContent = t.debts_paid;
          $("debt-pay-link").hidden = true;
        } else if (Date.now() < until) setTimeout(poll, 2000);
      };
      setTimeout(poll, 2000);
    } catch (error) { failed(error); }
  });

  // ---- messages and account -------------------------------------------------------------

  async function loadMessages() {
    const items = await call("/api/v1/me/notifications");
    $("messages").replaceChildren(...items.map((note) => h(
      "li", {}, h("div", { class: "note", text: when(note.created_at) }), h("div", { text: note.body }),
    )));
    if (!items.length) $("messages").append(h("li", { class: "note", text: t.no_messages }));
  }

  async function loadAccount() {
    const me = await call("/api/v1/me");
    const payLater = me.agreement
      ? `${t.pay_later_on} ${yuan(me.agreement.per_session_limit_fen)}`
      : t.pay_later_off;
    const facts = [[t.phone, me.phone], [t.pay_later, me.blocked_for_arrears ? t.blocked : payLater]];
    $("account-facts").replaceChildren(...facts.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]));
    $("pause-pay-later").hidden = !me.agreement;
    $("pay-later-form").hidden = Boolean(me.agreement);
  }

  // Pay later: paused, exits hold with the fee and a QR code; turned on, with a limit per stay.
  $("pause-pay-later").addEventListener("click", async () => {
    try {
      await call("/api/v1/me/agreement", { method: "DELETE" });
      await loadAccount();
    } catch (error) { failed(error); }
  });
  $("pay-later-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const limit = Math.round(Number($("pay-later-limit").value) * 100);
    try {
      await call("/api/v1/me/agreement", { method: "PUT", json: { per_session_limit_fen: limit } });
      await loadAccount();
    } catch (error) { failed(error); }
  });

  $("export").addEventListener("click", async () => {
    try {
      const blob = await (await call("/api/v1/me/export", { raw: true })).blob();
      const link = $("export-link");
      link.href = URL.createObjectURL(blob);
      link.click();
    } catch (error) { failed(error); }
  });

  $("delete-account").addEventListener("click", async () => {
    if (!window.confirm(t.delete_confirm)) return;
    try {
      await call("/api/v1/me", { method: "DELETE" });
      signedOut();
      $("sign-in-status").textContent = t.deleted;
    } catch (error) { failed(error); }
  });

  if (tokens.access) signedIn();
})();
