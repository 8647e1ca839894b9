// The bar tablet: pick the player (their open session, or a tap of their card on the bar's reader), tap items
// from the catalogue, confirm.
"use strict";

// Which bar this tablet is (`?pos=bar-1` once, then kept): a tap on that bar's reader picks the player here.
// Without one, a tap on any bar reader does (a club with one bar).
const POS = (() => {
  const given = new URLSearchParams(location.search).get("pos");
  if (given) localStorage.setItem("club.pos", given);
  return localStorage.getItem("club.pos");
})();

let sessions = [];
let catalogue = [];
let picked = null; // session id
const order = new Map(); // item_id -> quantity


function total() {
  let cents = 0;
  for (const [id, qty] of order) cents += Math.round(catalogue.find((i) => i.item_id === id).unit_price * 100) * qty;
  return cents / 100;
}

function render() {
  document.getElementById("sessions").replaceChildren(
    ...(sessions.length
      ? sessions.map((s) => el("li", {
          class: s.session_id === picked ? "picked" : "",
          "data-session": s.session_id,
          onclick: () => { picked = s.session_id; render(); },
        }, el("span", { class: "name" }, s.first_name || s.member_id), el("span", { class: "court" }, s.court_id)))
      : [el("li", { class: "empty" }, T.nobodyPlaying)]),
  );
  document.getElementById("items").replaceChildren(
    ...catalogue.map((item) => el("button", {
      class: "item", "data-item": item.item_id,
      onclick: () => { order.set(item.item_id, Math.min(99, (order.get(item.item_id) || 0) + 1)); render(); },
    }, el("span", {}, item.name), el("small", {}, money(item.unit_price)))),
  );
  document.getElementById("order").replaceChildren(
    ...[...order].map(([id, qty]) => {
      const item = catalogue.find((i) => i.item_id === id);
      return el("li", {}, el("span", { class: "qty" }, `${qty} ×`), el("span", { class: "name" }, item.name),
        el("span", {}, money(item.unit_price * qty)),
        el("button", { class: "small", onclick: () => { qty > 1 ? order.set(id, qty - 1) : order.delete(id); render(); } }, "−"));
    }),
  );
  document.getElementById("total").textContent = money(total());
  document.getElementById("confirm").disabled = !(picked && order.size);
}

async function refreshSessions() {
  sessions = (await api("GET", "/api/v1/sessions")).sessions;
  if (picked && !sessions.some((s) => s.session_id === picked)) picked = null;
  render();
}

async function confirmOrder() {
  const items = [...order].map(([id, quantity]) => {
    const item = catalogue.find((i) => i.item_id === id);
    return { item_id: id, name: item.name, quantity, unit_price: item.unit_price };
  });
  document.getElementById("confirm").disabled = true;
  try {
    const answer = await api("POST", "/api/v1/consumption", { request_id: requestId(), session_id: picked, items });
    if (answer.status === "ok") {
      show(`${T.recorded}: ${money(answer.total)} (${T.sessionTotal} ${money(answer.session_total)})`, true);
      order.clear();
    } else {
      show(answer.message || answer.reason, false);
    }
  } catch (error) {
    show(`${T.error}: ${error.message}`, false);
  }
  render();
}

// A card on the bar's reader: the agent answers with the holder's open session (or why there is none).
async function cardAtTheBar(data) {
  if (!data.pos || (POS && data.pos !== POS)) return; // a court's reader, or another bar's
  show(data.message, data.status === "granted");
  if (data.status !== "granted") return;
  if (!sessions.some((s) => s.session_id === data.session_id)) await refreshSessions().catch(() => {});
  picked = data.session_id;
  render();
}

async function setup() {
  document.documentElement.lang = LANG;
  document.getElementById("title").textContent = T.bar;
  document.getElementById("players-title").textContent = T.players;
  document.getElementById("items-title").textContent = T.items;
  document.getElementById("total-title").textContent = T.total;
  document.getElementById("confirm").textContent = T.confirm;
  document.getElementById("clear").textContent = T.clear;
  document.getElementById("lang").textContent = T.language;
  document.getElementById("lang").addEventListener("click", toggleLanguage);
  document.getElementById("clear").addEventListener("click", () => { order.clear(); render(); });
  document.getElementById("confirm").addEventListener("click", confirmOrder);
  if (!token()) { show(T.noToken, false); return; }
  try {
    catalogue = (await api("GET", "/api/v1/catalogue")).items;
    await refreshSessions();
  } catch (error) {
    show(`${T.error}: ${error.message}`, false);
  }
  // every court change (a check-in, a checkout) refreshes who can be charged
  live({ court: () => { refreshSessions().catch(() => {}); }, decision: cardAtTheBar }, linkState);
  render();
}

setup();
