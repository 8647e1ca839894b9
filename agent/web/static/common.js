// Shared by the tablet pages: the caller's token, the language, calls to the agent, live events.
"use strict";

const TEXTS = {
  "pt-BR": {
    court: "Quadra", players: "Jogadores", nobody: "Quadra livre", highlights: "Lances",
    credit: "crédito", credits: "créditos", code: "Código de sócio", checkin: "Entrar", clear: "Limpar",
    offline: "Sem conexão com o agente: tentando de novo", online: "Conectado",
    noToken: "Este tablet ainda não foi configurado: abra a página com ?token=... uma vez.",
    error: "Erro", language: "English",
    bar: "Bar", items: "Itens", total: "Total", confirm: "Confirmar", recorded: "Registrado",
    sessionTotal: "total da sessão", nobodyPlaying: "Ninguém em quadra",
    desk: "Recepção", courts: "Quadras", devices: "Dispositivos", sync: "Sincronização", denied: "Acessos negados",
    noDenied: "Nenhum acesso negado", on: "online", off: "offline", pending: "pendentes", dead: "com erro",
    lastSync: "última sincronização", breaker: "circuito", memberList: "Lista de sócios", members: "sócios",
    synced: "sincronizada em",
    deviceColumns: ["Dispositivo", "Tipo", "Quadra", "Estado", "Desde", "Bateria", "Versão"],
    kinds: { reader: "leitor", button: "botão", tablet: "tablet", display: "tela", camera: "câmera" },
    storage: "Armazenamento", levels: { ok: "ok", warn: "atenção", critical: "crítico", over: "acima do limite" },
  },
  en: {
    court: "Court", players: "Players", nobody: "Court free", highlights: "Highlights",
    credit: "credit", credits: "credits", code: "Member code", checkin: "Check in", clear: "Clear",
    offline: "No connection to the agent: retrying", online: "Connected",
    noToken: "This tablet is not set up yet: open the page once with ?token=...",
    error: "Error", language: "Português",
    bar: "Bar", items: "Items", total: "Total", confirm: "Confirm", recorded: "Recorded",
    sessionTotal: "session total", nobodyPlaying: "Nobody on court",
    desk: "Front desk", courts: "Courts", devices: "Devices", sync: "Sync", denied: "Refused taps",
    noDenied: "No refused taps", on: "online", off: "offline", pending: "pending", dead: "failed",
    lastSync: "last sync", breaker: "breaker", memberList: "Member list", members: "members",
    synced: "synced",
    deviceColumns: ["Device", "Kind", "Court", "State", "Since", "Battery", "Version"],
    kinds: { reader: "reader", button: "button", tablet: "tablet", display: "display", camera: "camera" },
    storage: "Storage", levels: { ok: "ok", warn: "warning", critical: "critical", over: "over budget" },
  },
};

function language() {
  const asked = new URLSearchParams(location.search).get("lang");
  if (asked && TEXTS[asked]) localStorage.setItem("club.lang", asked);
  const kept = localStorage.getItem("club.lang");
  return kept && TEXTS[kept] ? kept : "pt-BR";
}

const LANG = language();
const T = TEXTS[LANG];

function toggleLanguage() {
  localStorage.setItem("club.lang", LANG === "pt-BR" ? "en" : "pt-BR");
  location.reload();
}

// The token comes once in the address (set-up), then lives in this tablet's storage, out of the address bar.
function token() {
  const params = new URLSearchParams(location.search);
  const given = params.get("token");
  if (given) {
    localStorage.setItem("club.token", given);
    params.delete("token");
    history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
  }
  return localStorage.getItem("club.token");
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: "Bearer " + token(), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ error: "invalid_response", detail: String(response.status) }));
  if (!response.ok) throw new Error(data.detail || data.error || String(response.status));
  return data;
}

function requestId() {
  return (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2));
}

// Live events; EventSource reconnects by itself (the agent asks for 1 s) after the agent restarts.
function live(handlers, onState) {
  const source = new EventSource("/api/v1/live?access_token=" + encodeURIComponent(token()));
  source.onopen = () => onState(true);
  source.onerror = () => onState(false);
  for (const [kind, handle] of Object.entries(handlers)) {
    source.addEventListener(kind, (event) => handle(JSON.parse(event.data)));
  }
  return source;
}

function elapsed(sinceIso, now) {
  const seconds = Math.max(0, Math.floor((now - Date.parse(sinceIso)) / 1000));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  const two = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${two(m)}:${two(s)}` : `${two(m)}:${two(s)}`;
}

// Every `.timer` on the page counts up from its data-since, on the agent's clock (skewMs: agent minus tablet).
function tickTimers(skewMs) {
  const now = Date.now() + skewMs;
  for (const node of document.querySelectorAll(".timer")) node.textContent = elapsed(node.dataset.since, now);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

const money = (value) => new Intl.NumberFormat(LANG, { style: "currency", currency: "BRL" }).format(value);

let bannerTimer = null;

// The big message at the top: green for a yes, red for a no; it goes after a few seconds.
function show(message, good) {
  const banner = document.getElementById("banner");
  banner.textContent = message;
  banner.className = "banner " + (good ? "good" : "bad");
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => { banner.className = "banner hidden"; }, 6000);
}

function linkState(up) {
  const link = document.getElementById("link");
  link.className = "link " + (up ? "on" : "off");
  link.textContent = up ? T.online : T.offline;
}
