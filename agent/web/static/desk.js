// The front desk: every court, every device online or offline (battery and version for tablets), what waits to
// be synced and when the last sync happened, and the latest refused taps with their reasons.
"use strict";

const courts = new Map(); // court_id -> court state
const devices = new Map(); // device_id -> presence
let skewMs = 0;
const OUTBOX_EVERY_MS = 5000; // outbox depth and last sync are polled; courts, devices and taps are live

function when(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleString(LANG, { hour: "2-digit", minute: "2-digit", second: "2-digit", day: "2-digit", month: "2-digit" });
}

function renderCourts() {
  const now = Date.now() + skewMs;
  document.getElementById("courts").replaceChildren(
    ...[...courts.values()].sort((a, b) => a.court_id.localeCompare(b.court_id)).map((c) =>
      el("article", { class: "court-card" + (c.players.length ? " busy" : ""), "data-court": c.court_id },
        el("h3", {}, c.name || `${T.court} ${c.court_id}`),
        el("ul", {}, ...(c.players.length
          ? c.players.map((p) => el("li", {},
              el("span", { class: "name" }, p.first_name || p.member_id),
              el("span", { class: "timer", "data-since": p.started_at }, elapsed(p.started_at, now))))
          : [el("li", { class: "empty" }, T.nobody)])),
        el("p", { class: "muted" }, `${T.highlights}: ${c.highlight_count || 0}`))),
  );
}

function renderDevices() {
  document.getElementById("devices").replaceChildren(
    ...[...devices.values()].map((d) => el("tr", { "data-device": d.device_id, class: d.state },
      el("td", {}, d.device_id),
      el("td", {}, T.kinds[d.kind] || d.kind),
      el("td", {}, d.court || "—"),
      el("td", { class: "state" }, el("span", { class: "badge " + d.state }, d.state === "online" ? T.on : T.off)),
      el("td", {}, when(d.since)),
      el("td", { class: "battery" }, d.battery === undefined || d.battery === null ? "—"
        : `${d.battery}%${d.charging ? " ⚡" : ""}`),
      el("td", { class: "version" }, d.app_version || "—"))),
  );
}

async function refreshOutbox() {
  const data = await api("GET", "/api/v1/outbox");
  document.getElementById("sync").replaceChildren(
    ...data.destinations.map((d) => el("tr", { "data-destination": d.destination, class: d.dead ? "off" : "" },
      el("th", {}, d.destination),
      el("td", { class: "pending" }, `${d.pending} ${T.pending}`),
      el("td", {}, d.dead ? `${d.dead} ${T.dead}` : ""),
      el("td", {}, `${T.lastSync}: ${when(d.last_success_at)}`),
      el("td", { class: "muted" }, d.breaker === "closed" ? "" : `${T.breaker}: ${d.breaker}`))),
  );
  const m = data.member_list;
  document.getElementById("members").textContent =
    `${T.memberList}: v${m.version}, ${m.members} ${T.members}, ${T.synced} ${when(m.synced_at)}`;
  const s = data.storage;
  const storage = document.getElementById("storage");
  storage.className = "storage " + (s ? s.level : "ok");
  storage.textContent = s
    ? `${T.storage}: ${s.used_pct}% (${Math.round(s.used_bytes / 1048576)} / ${Math.round(s.budget_bytes / 1048576)} MB) — ${T.levels[s.level]}`
    : "";
}

async function refreshDenied() {
  const data = await api("GET", "/api/v1/decisions/denied");
  document.getElementById("denied").replaceChildren(
    ...(data.denied.length
      ? data.denied.map((t) => el("li", { "data-seq": t.seq },
          el("span", { class: "time" }, when(t.at)),
          el("span", { class: "who" }, t.first_name || t.card_hint || "?"),
          el("span", { class: "where" }, [t.court_id, t.device_id].filter(Boolean).join(" · ")),
          el("span", { class: "reason" }, t.message || t.reason)))
      : [el("li", { class: "empty" }, T.noDenied)]),
  );
}

function refreshAll() {
  refreshOutbox().catch(() => {});
  refreshDenied().catch(() => {});
}

function setup() {
  document.documentElement.lang = LANG;
  document.getElementById("title").textContent = T.desk;
  document.getElementById("courts-title").textContent = T.courts;
  document.getElementById("devices-title").textContent = T.devices;
  document.getElementById("sync-title").textContent = T.sync;
  document.getElementById("denied-title").textContent = T.denied;
  document.getElementById("lang").textContent = T.language;
  document.getElementById("lang").addEventListener("click", toggleLanguage);
  document.getElementById("devices-head").replaceChildren(...T.deviceColumns.map((c) => el("th", {}, c)));
  if (!token()) { show(T.noToken, false); return; }
  live(
    {
      court: (data) => {
        if (data.updated_at) skewMs = Date.parse(data.updated_at) - Date.now();
        courts.set(data.court_id, data);
        renderCourts();
      },
      device: (data) => { devices.set(data.device_id, data); renderDevices(); },
      decision: (data) => { if (data.status === "denied") refreshDenied().catch(() => {}); },
    },
    (up) => {
      linkState(up);
      if (up) refreshAll(); // after the agent restarts, everything it holds is read again
    },
  );
  setInterval(() => tickTimers(skewMs), 1000);
  setInterval(() => refreshOutbox().catch(() => {}), OUTBOX_EVERY_MS);
}

setup();
