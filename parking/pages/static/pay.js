// The pay page: start the payment, open the provider's payer page, then follow the payment
// and the barrier by polling (no reload) until "请通行" (also while the fee is shown: staff may
// open the barrier by hand before any payment).
"use strict";
(() => {
  const main = document.getElementById("pay-page");
  const t = JSON.parse(document.getElementById("texts").textContent);
  const api = main.dataset.api;
  const status = document.getElementById("status");
  const payButton = document.getElementById("pay");
  const payLink = document.getElementById("pay-link");
  const FINAL = new Set(["open", "opened", "settled", "expired", "unknown", "no_tariff"]);
  const POLL_MS = 2000;
  let polling = false;

  function show(state, message) {
    main.dataset.state = state;
    status.className = `status status-${state}`;
    status.textContent = message || t[`state_${state}`];
    if (payButton) payButton.hidden = state !== "due";
    if (payLink && state !== "paying") payLink.hidden = true;
  }

  function stateOf(payment) {
    if (payment.status === "pending") return "paying";
    if (payment.status === "succeeded") return payment.gate_open ? "open" : "paid";
    return "settled";
  }

  async function poll() {
    try {
      const response = await fetch(api, { cache: "no-store", headers: { Accept: "application/json" } });
      if (response.ok) show(stateOf(await response.json()));
      else if (response.status === 409) {
        // The hold was lifted before any payment started (staff by hand, the booth).
        const body = await response.json().catch(() => null);
        if (body && body.error && body.error.code === "hold_lifted") {
          show(body.error.details.outcome === "opened_by_operator" ? "opened" : "settled");
        }
      }
    } catch (_) {
      // Offline for a moment: the next poll tries again.
    }
    if (!FINAL.has(main.dataset.state)) setTimeout(poll, POLL_MS);
    else polling = false;
  }

  function follow() {
    if (!polling) {
      polling = true;
      setTimeout(poll, POLL_MS);
    }
  }

  async function pay() {
    payButton.disabled = true;
    try {
      const response = await fetch(api, { method: "POST", headers: { Accept: "application/json" } });
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        const code = body && body.error ? body.error.code : "";
        if (code === "qr_expired") show("expired");
        else if (code === "stay_already_closed" || code === "nothing_to_pay") show("settled");
        else show("due", t.error_provider);
        return;
      }
      show(stateOf(body));
      if (body.pay_url && body.status === "pending") {
        payLink.href = body.pay_url;
        payLink.hidden = false;
        window.open(body.pay_url, "_blank", "noopener");
      }
      follow();
    } catch (_) {
      show("due", t.error_network);
    } finally {
      payButton.disabled = false;
    }
  }

  if (payButton) payButton.addEventListener("click", pay);
  // While the fee is shown the page also polls: staff may open the barrier by hand meanwhile.
  if (["due", "paying", "paid"].includes(main.dataset.state)) follow();
})();
