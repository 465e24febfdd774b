// Riffloop's listen-and-rate page. Every call goes to the gateway's public API, GatewayService,
// over the Connect protocol (the same handlers, auth and rate limits as gRPC). Pages, by hash:
// #signin, #create (upload, sliders, generate, play, rate), #listen (the queue), #history.
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampNow } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import {
  GatewayService,
  type ModelSummary,
  type Track,
  TrackStatus,
  UploadWholeSongRequestSchema,
  UploadWholeSongResponseSchema,
} from "./gen/riffloop/v1/gateway_service_pb.js";

const TOKEN_KEY = "riffloop.token";
const MAX_SONGS = 3;
// Content types the gateway names; anything else is sent as "" and the gateway sniffs the bytes.
const CONTENT_TYPES = new Set(["audio/wav", "audio/x-wav", "audio/wave", "audio/flac", "audio/ogg", "audio/mpeg"]);

const $ = <T extends HTMLElement>(selector: string, root: ParentNode = document): T => {
  const found = root.querySelector<T>(selector);
  if (!found) throw new Error(`missing ${selector}`);
  return found;
};

function token(): string {
  return sessionStorage.getItem(TOKEN_KEY) ?? "";
}

const auth: Interceptor = (next) => async (request) => {
  request.header.set("Authorization", `Bearer ${token()}`);
  return next(request);
};
const client = createClient(
  GatewayService,
  createConnectTransport({ baseUrl: location.origin, useBinaryFormat: true, interceptors: [auth] }),
);

/** The API's own reason for a refusal (the gateway's error message), for the listener. */
function reason(error: unknown): string {
  const err = ConnectError.from(error);
  if (err.code === Code.Unauthenticated) return `${err.rawMessage}. Sign in again.`;
  return err.rawMessage || err.message;
}

function say(element: HTMLElement, text: string, kind: "" | "refused" | "accepted" = ""): void {
  element.textContent = text;
  element.className = kind;
}

// -- pages -----------------------------------------------------------------------------------

const PAGES = ["signin", "create", "listen", "history"] as const;
type Page = (typeof PAGES)[number];

function show(page: Page): void {
  for (const name of PAGES) $(`#page-${name}`).hidden = name !== page;
  for (const link of document.querySelectorAll<HTMLAnchorElement>("nav a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `Riffloop – ${$(`#page-${page} h1`).textContent}`;
  if (page === "history") void loadHistory();
}

/** The user a stored token names (its ``sub``), to show who is signed in; "" if unreadable. */
function tokenUser(value: string): string {
  try {
    const payload = value.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return String(JSON.parse(atob(payload)).sub ?? "");
  } catch {
    return "";
  }
}

function route(): void {
  const wanted = location.hash.slice(1) as Page;
  const page: Page = !token() ? "signin" : PAGES.includes(wanted) ? wanted : "create";
  show(page);
  $("#main").focus();
}

// -- sign-in ---------------------------------------------------------------------------------

async function setUpSignIn(): Promise<void> {
  const status = $("#signin-status");
  const config = await fetch("/auth/config").then((r) => r.json()).catch(() => ({ devSignIn: false }));
  $("#dev-signin").hidden = !config.devSignIn;
  $<HTMLFormElement>("#dev-signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $<HTMLInputElement>("#signin-name").value.trim();
    const response = await fetch("/auth/dev-token", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name }),
    });
    const body = await response.json();
    if (!response.ok) return say(status, body.error ?? "sign-in failed", "refused");
    signedIn(body.token, body.user);
  });
  $<HTMLFormElement>("#token-signin").addEventListener("submit", (event) => {
    event.preventDefault();
    signedIn($<HTMLTextAreaElement>("#signin-token").value.trim(), "");
  });
}

function signedIn(value: string, user: string): void {
  sessionStorage.setItem(TOKEN_KEY, value);
  say($("#signin-status"), user ? `Signed in as ${user}.` : "Token saved.", "accepted");
  $("#signin-link").textContent = user ? `Signed in: ${user}` : "Signed in";
  location.hash = "#create";
}

// -- uploads ---------------------------------------------------------------------------------

const songIds: string[] = [];

/** UploadWholeSong as one Connect unary call over XMLHttpRequest: fetch cannot report upload
 * progress, XMLHttpRequest can. Binary protobuf body; a refusal is Connect's JSON error. */
function uploadWholeSong(file: File, bytes: Uint8Array, onProgress: (fraction: number) => void): Promise<string> {
  const body = toBinary(
    UploadWholeSongRequestSchema,
    create(UploadWholeSongRequestSchema, {
      metadata: { title: file.name.slice(0, 200), contentType: CONTENT_TYPES.has(file.type) ? file.type : "" },
      audio: bytes,
    }),
  );
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/${GatewayService.typeName}/UploadWholeSong`);
    xhr.responseType = "arraybuffer";
    xhr.setRequestHeader("Content-Type", "application/proto");
    xhr.setRequestHeader("Connect-Protocol-Version", "1");
    xhr.setRequestHeader("Authorization", `Bearer ${token()}`);
    xhr.upload.onprogress = (event) => event.lengthComputable && onProgress(event.loaded / event.total);
    xhr.onerror = () => reject(new Error("the gateway could not be reached"));
    xhr.onload = () => {
      const data = new Uint8Array(xhr.response as ArrayBuffer);
      if (xhr.status === 200) return resolve(fromBinary(UploadWholeSongResponseSchema, data).songId);
      try {
        const error = JSON.parse(new TextDecoder().decode(data));
        reject(new Error(error.message ?? `HTTP ${xhr.status}`));
      } catch {
        reject(new Error(`HTTP ${xhr.status}`));
      }
    };
    xhr.send(body);
  });
}

async function addFiles(files: Iterable<File>): Promise<void> {
  for (const file of files) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = file.name;
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = 0;
    bar.setAttribute("aria-label", `Upload of ${file.name}`);
    const note = document.createElement("p");
    note.setAttribute("role", "status");
    item.append(name, bar, note);
    $("#uploads").append(item);
    if (songIds.length >= MAX_SONGS) {
      bar.remove();
      say(note, `Refused: a track is made from at most ${MAX_SONGS} songs.`, "refused");
      continue;
    }
    try {
      const id = await uploadWholeSong(file, new Uint8Array(await file.arrayBuffer()), (f) => (bar.value = f));
      bar.value = 1;
      if (songIds.includes(id)) {
        say(note, "Already in your list.", "accepted");
      } else {
        songIds.push(id);
        say(note, "Uploaded.", "accepted");
      }
    } catch (error) {
      bar.remove();
      say(note, `Refused: ${error instanceof Error ? error.message : String(error)}`, "refused");
    }
  }
  $<HTMLButtonElement>("#generate").disabled = songIds.length === 0;
}

function setUpUploads(): void {
  const drop = $("#drop");
  const input = $<HTMLInputElement>("#files");
  input.addEventListener("change", () => {
    void addFiles(Array.from(input.files ?? []));
    input.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    void addFiles(Array.from(event.dataTransfer?.files ?? []));
  });
  for (const id of ["similarity", "quality"]) {
    const slider = $<HTMLInputElement>(`#${id}`);
    const output = $<HTMLOutputElement>(`#${id}-value`);
    slider.addEventListener("input", () => {
      output.value = id === "similarity" ? Number(slider.value).toFixed(2) : slider.value;
    });
  }
}

// -- generation ------------------------------------------------------------------------------

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function generate(): Promise<void> {
  const button = $<HTMLButtonElement>("#generate");
  const status = $("#generate-status");
  const progress = $("#generate-progress");
  button.disabled = true;
  progress.hidden = false;
  try {
    const { trackId } = await client.generate({
      songIds,
      similarity: Number($<HTMLInputElement>("#similarity").value),
      quality: Number($<HTMLInputElement>("#quality").value),
    });
    const started = Date.now();
    for (;;) {
      const { track } = await client.getTrack({ trackId });
      if (track?.status === TrackStatus.READY) {
        say(status, "Your track is ready.", "accepted");
        await playTrack($("#create-player"), track, "Your track");
        return;
      }
      if (track?.status === TrackStatus.FAILED) {
        say(status, `Generation failed: ${track.failureReason}`, "refused");
        return;
      }
      say(status, `Generating… ${Math.round((Date.now() - started) / 1000)} s`);
      await sleep(1000);
    }
  } catch (error) {
    say(status, `Refused: ${reason(error)}`, "refused");
  } finally {
    progress.hidden = true;
    button.disabled = songIds.length === 0;
  }
}

// -- the player: honest listening time, stars -------------------------------------------------

/** Seconds actually heard: the union of the ranges the element played (audio.played), so a
 * pause adds nothing, a seek skips what was jumped over and a replayed passage counts once. */
function heardSeconds(audio: HTMLAudioElement): number {
  let total = 0;
  for (let i = 0; i < audio.played.length; i++) total += audio.played.end(i) - audio.played.start(i);
  return total;
}

let playerSerial = 0;

async function playTrack(host: HTMLElement, track: Track, title: string): Promise<void> {
  const template = $<HTMLTemplateElement>("#player-template");
  const player = template.content.firstElementChild!.cloneNode(true) as HTMLElement;
  const serial = ++playerSerial;
  $(".player-title", player).textContent = title;
  const audio = $<HTMLAudioElement>("audio", player);
  audio.setAttribute("aria-label", `${title}: audio player`);
  const image = $<HTMLImageElement>(".mel", player);
  const status = $(".player-status", player);
  const stars = $(".stars", player);
  for (let n = 1; n <= 5; n++) {
    const label = document.createElement("label");
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = `stars-${serial}`;
    radio.value = String(n);
    radio.required = true;
    label.append(radio, `${n} ${n === 1 ? "star" : "stars"}`);
    stars.append(label);
  }
  host.replaceChildren(player);
  const chunks: Uint8Array[] = [];
  for await (const part of client.streamAudio({ trackId: track.trackId })) chunks.push(part.chunk);
  audio.src = URL.createObjectURL(new Blob(chunks as BlobPart[], { type: track.contentType || "audio/wav" }));
  const mel = await client.getTrackMelImage({ trackId: track.trackId });
  image.src = URL.createObjectURL(new Blob([mel.png as BlobPart], { type: "image/png" }));
  image.alt = `Mel spectrogram of the track (${track.durationSeconds.toFixed(1)} s): time left to right, pitch bottom to top`;
  let ended = false;
  audio.addEventListener("ended", () => {
    ended = true;
    say(status, "Played to the end. How was it?");
  });
  let reported = false;
  const form = $<HTMLFormElement>("form.rate", player);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = form.querySelector<HTMLInputElement>("input[type=radio]:checked");
    if (!chosen) return say(status, "Choose 1 to 5 stars first.", "refused");
    const button = $<HTMLButtonElement>("button", form);
    button.disabled = true;
    try {
      if (!reported) {
        const heard = heardSeconds(audio);
        await client.reportListen({
          trackId: track.trackId,
          secondsListened: heard,
          completed: ended || heard >= track.durationSeconds - 0.25,
          clientTime: timestampNow(),
        });
        reported = true;
      }
      await client.rate({ trackId: track.trackId, stars: Number(chosen.value), clientTime: timestampNow() });
      say(status, `Rated ${chosen.value} ${chosen.value === "1" ? "star" : "stars"}. Thank you.`, "accepted");
    } catch (error) {
      say(status, `Refused: ${reason(error)}`, "refused");
      button.disabled = false;
    }
  });
  player.dataset.ready = "true";
}

async function nextTrack(): Promise<void> {
  const status = $("#listen-status");
  try {
    const { track, retryAfterMs } = await client.nextTrack({});
    if (!track) {
      $("#listen-player").replaceChildren();
      say(status, `Nothing waiting for you now; try again in ${Math.ceil(retryAfterMs / 1000)} s.`);
      return;
    }
    say(status, "");
    await playTrack($("#listen-player"), track, "Next in the queue");
  } catch (error) {
    say(status, `Refused: ${reason(error)}`, "refused");
  }
}

// -- model history ---------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag: string, attributes: Record<string, string | number>, text?: string): SVGElement {
  const element = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

function chart(models: ModelSummary[]): SVGElement {
  // about one CSS pixel per unit on a 360 px phone; wider as versions accumulate
  const width = Math.max(320, 60 + 90 * models.length);
  const height = 300;
  const left = 44;
  const bottom = 56;
  const top = 16;
  const y = (stars: number) => top + ((5 - stars) / 4) * (height - top - bottom);
  const step = (width - left - 16) / Math.max(models.length, 1);
  const x = (i: number) => left + step * (i + 0.5);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": "chart-title" });
  root.append(svg("title", { id: "chart-title" }, "Mean stars per model version with 95 % intervals"));
  for (let stars = 1; stars <= 5; stars++) {
    root.append(svg("line", { x1: left, x2: width - 8, y1: y(stars), y2: y(stars), stroke: "#ddd" }));
    root.append(svg("text", { x: left - 8, y: y(stars) + 4, "text-anchor": "end", "font-size": 12 }, `${stars}★`));
  }
  models.forEach((model, i) => {
    const label = model.version.length > 14 ? `${model.version.slice(0, 13)}…` : model.version;
    root.append(
      svg("text", { x: x(i), y: height - bottom + 18, "text-anchor": "middle", "font-size": 11 }, label + (model.current ? " ●" : "")),
    );
    const kinds = [
      { summary: model.generated, dx: -8, color: "#5a2ca0", filled: true },
      { summary: model.baseline, dx: 8, color: "#b35900", filled: false },
    ];
    for (const { summary, dx, color, filled } of kinds) {
      if (!summary || Number(summary.ratingCount) === 0) continue;
      const cx = x(i) + dx;
      const interval = summary.meanStarsInterval;
      if (interval) {
        root.append(svg("line", { x1: cx, x2: cx, y1: y(interval.low), y2: y(interval.high), stroke: color, "stroke-width": 2 }));
        for (const end of [interval.low, interval.high]) {
          root.append(svg("line", { x1: cx - 5, x2: cx + 5, y1: y(end), y2: y(end), stroke: color, "stroke-width": 2 }));
        }
      }
      const cy = y(summary.meanStars);
      root.append(
        filled
          ? svg("circle", { cx, cy, r: 5, fill: color })
          : svg("rect", { x: cx - 5, y: cy - 5, width: 10, height: 10, fill: "#fff", stroke: color, "stroke-width": 2 }),
      );
    }
  });
  root.append(svg("text", { x: 8, y: height - 10, "font-size": 12 }, "● after a version: served now"));
  return root;
}

function formatMean(count: bigint, mean: number): string {
  return Number(count) === 0 ? "–" : mean.toFixed(2);
}

async function loadHistory(): Promise<void> {
  const status = $("#history-status");
  try {
    const { models } = await client.listModels({});
    $("#chart").replaceChildren(chart(models));
    const rows = models.map((model) => {
      const g = model.generated;
      const b = model.baseline;
      const interval = g?.meanStarsInterval ? `${g.meanStarsInterval.low.toFixed(2)}–${g.meanStarsInterval.high.toFixed(2)}` : "–";
      const cells = [
        model.version + (model.current ? " (current)" : ""),
        formatMean(g?.ratingCount ?? 0n, g?.meanStars ?? 0),
        interval,
        String(g?.ratingCount ?? 0n),
        formatMean(b?.ratingCount ?? 0n, b?.meanStars ?? 0),
        String(b?.ratingCount ?? 0n),
      ];
      const row = document.createElement("tr");
      cells.forEach((text, column) => {
        const cell = document.createElement(column === 0 ? "th" : "td");
        if (column === 0) cell.setAttribute("scope", "row");
        cell.textContent = text;
        row.append(cell);
      });
      return row;
    });
    $("#history-table tbody").replaceChildren(...rows);
    say(status, models.length === 1 ? "1 model version." : `${models.length || "No"} model versions.`);
  } catch (error) {
    say(status, `Refused: ${reason(error)}`, "refused");
  }
}

// -- start -----------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  void setUpSignIn();
  setUpUploads();
  if (token()) $("#signin-link").textContent = `Signed in: ${tokenUser(token()) || "yes"}`;
  $("#generate").addEventListener("click", () => void generate());
  $("#next").addEventListener("click", () => void nextTrack());
  $("#refresh").addEventListener("click", () => void loadHistory());
  route();
});
