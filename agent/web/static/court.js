// The court tablet: who is playing, for how long, credits left, highlights; check-in by member code.
"use strict";

const courtId = new URLSearchParams(location.search).get("court");
let state = { players: [], highlight_count: 0 };
let skewMs = 0; // the agent's clock minus this tablet's: timers follow the agent, whatever the tablet's clock says


function render() {
  document.getElementById("court-name").textContent = state.name || `${T.court} ${courtId}`;
  document.getElementById("highlight-count").textContent = state.highlight_count || 0;
  const list = document.getElementById("players");
  const now = Date.now() + skewMs;
  list.replaceChildren(
    ...(state.players.length
      ? state.players.map((p) =>
          el("li", { "data-session": p.session_id },
            el("span", { class: "name" }, p.first_name || p.member_id),
            el("span", { class: "timer", "data-since": p.started_at }, elapsed(p.started_at, now)),
            el("span", { class: "credits" }, credits(p.credits_left)),
            el("span", { class: "spent" }, p.consumption_total ? money(p.consumption_total) : "")))
      : [el("li", { class: "empty" }, T.nobody)]),
  );
}

function credits(n) {
  if (n === null || n === undefined) return "";
  return `${n} ${n === 1 ? T.credit : T.credits}`;
}

async function checkin() {
  const input = document.getElementById("code");
  const code = input.value.trim();
  if (!code) return;
  try {
    const answer = await api("POST", `/api/v1/courts/${encodeURIComponent(courtId)}/checkin`,
      { request_id: requestId(), member_code: code });
    show(answer.message || answer.reason, answer.status === "granted");
  } catch (error) {
    show(`${T.error}: ${error.message}`, false);
  }
  input.value = "";
}

function setup() {
  document.documentElement.lang = LANG;
  document.getElementById("players-title").textContent = T.players;
  document.getElementById("highlights-title").textContent = T.highlights;
  document.getElementById("code-label").textContent = T.code;
  document.getElementById("checkin").textContent = T.checkin;
  document.getElementById("clear").textContent = T.clear;
  document.getElementById("lang").textContent = T.language;
  document.getElementById("lang").addEventListener("click", toggleLanguage);
  const input = document.getElementById("code");
  const keys = document.getElementById("keys");
  for (const key of ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0"]) {
    keys.append(el("button", { class: "key", onclick: () => { input.value = (input.value + key).slice(0, 12); } }, key));
  }
  document.getElementById("clear").addEventListener("click", () => { input.value = ""; });
  document.getElementById("checkin").addEventListener("click", checkin);
  if (!token()) { show(T.noToken, false); return; }
  live(
    {
      court: (data) => {
        if (data.court_id !== courtId) return;
        if (data.updated_at) skewMs = Date.parse(data.updated_at) - Date.now();
        state = data;
        render();
      },
      decision: (data) => { if (data.court_id === courtId && data.message) show(data.message, data.status === "granted"); },
    },
    linkState,
  );
  render();
  setInterval(() => tickTimers(skewMs), 1000);
}

setup();
