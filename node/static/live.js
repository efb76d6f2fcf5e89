// Sesame live pages: connects this page to its node over a WebRTC data channel and keeps the
// parts a template marked (islands) up to date as tuples commit. Plain JavaScript, no build
// step; the page works without it.
//
// Markup it understands:
//   <script src="/_sesame/live.js" data-site="SITE" defer></script>
//   <el data-sesame-live="COLLECTION/KEY" data-field="F">   text of value[F] (or the value)
//   <ul data-sesame-list="COLLECTION" data-prefix="P">       one item per tuple under P, from
//     <template>…<x data-field="F">…</template>               the list's <template>
//   <el data-sesame-presence="TOPIC" hidden><x data-count>  how many view TOPIC now
//   <form data-sesame-post="COLLECTION" data-prefix="P">     posts a new tuple (the form's
//                                                            fields) without a reload
// A notice appears when the site publishes a version of this page newer than the one shown.
(function () {
  "use strict";
  var script = document.currentScript;
  var site = script && script.dataset.site;
  if (!site || !window.RTCPeerConnection) return;

  var PROTOCOL = 1;
  var clientId = "v-" + Math.random().toString(36).slice(2, 12);
  var seq = 0, pushId = 0;
  var dc = null, pc = null, open = false, retry = 500;
  var subs = {};        // collection -> {id, tuples: {key: value}}
  var pending = {};     // push id -> form
  var loadedTag = null; // the ETag of the page as loaded
  var started = 0, setupMs = null; // offer made → welcome, for the curious (and benchmarks)

  function text(v) {
    if (v === null || v === undefined) return "";
    return typeof v === "object" ? JSON.stringify(v) : String(v);
  }
  function field(value, name) {
    if (!name) return value;
    return value && typeof value === "object" ? value[name] : undefined;
  }

  // Islands, grouped by collection.
  function collections() {
    var set = {};
    document.querySelectorAll("[data-sesame-live]").forEach(function (el) {
      set[el.dataset.sesameLive.split("/")[0]] = true;
    });
    document.querySelectorAll("[data-sesame-list]").forEach(function (el) {
      set[el.dataset.sesameList] = true;
    });
    return Object.keys(set);
  }

  function render(collection) {
    var tuples = subs[collection].tuples;
    document.querySelectorAll("[data-sesame-live]").forEach(function (el) {
      var at = el.dataset.sesameLive, slash = at.indexOf("/");
      if (at.slice(0, slash) !== collection) return;
      var key = at.slice(slash + 1);
      if (!(key in tuples)) return;
      var v = text(field(tuples[key], el.dataset.field));
      if (el.textContent !== v) el.textContent = v;
    });
    document.querySelectorAll("[data-sesame-list]").forEach(function (list) {
      if (list.dataset.sesameList !== collection) return;
      var tpl = list.querySelector("template");
      if (!tpl) return;
      var prefix = list.dataset.prefix || "";
      var keys = Object.keys(tuples).filter(function (k) { return k.indexOf(prefix) === 0; }).sort();
      var items = document.createDocumentFragment();
      keys.forEach(function (k) {
        var item = tpl.content.cloneNode(true);
        item.querySelectorAll("[data-field]").forEach(function (f) {
          f.textContent = text(field(tuples[k], f.dataset.field));
        });
        items.appendChild(item);
      });
      Array.prototype.slice.call(list.children).forEach(function (c) {
        if (c !== tpl) list.removeChild(c);
      });
      if (keys.length) list.insertBefore(items, tpl);
      list.dataset.sesameCount = String(keys.length);
    });
  }

  function send(msg) {
    if (open) dc.send(JSON.stringify(msg));
  }

  function onMessage(ev) {
    var msg = JSON.parse(ev.data), kind = Object.keys(msg)[0], m = msg[kind];
    if (kind === "Welcome") {
      open = true; retry = 500;
      if (setupMs === null) setupMs = performance.now() - started;
      var id = 1;
      collections().forEach(function (c) {
        subs[c] = { id: id, tuples: {} };
        send({ Subscribe: { id: id++, target: { Site: { site: site, collection: c, prefix: "" } }, since: 0 } });
      });
      document.querySelectorAll("[data-sesame-presence]").forEach(function (el) {
        send({ Presence: { topic: el.dataset.sesamePresence } });
      });
      send({ WatchVersion: { site: site } });
    } else if (kind === "Snapshot" || kind === "Changes") {
      for (var c in subs) {
        if (subs[c].id !== m.sub) continue;
        m.tuples.forEach(function (t) {
          if (t.value === null) delete subs[c].tuples[t.key];
          else subs[c].tuples[t.key] = t.value;
        });
        render(c);
      }
    } else if (kind === "Presence") {
      document.querySelectorAll("[data-sesame-presence]").forEach(function (el) {
        if (el.dataset.sesamePresence !== m.topic) return;
        var n = el.querySelector("[data-count]") || el;
        n.textContent = String(m.count);
        el.hidden = false;
      });
    } else if (kind === "Version") {
      checkVersion();
      if (navigator.serviceWorker && navigator.serviceWorker.controller) {
        navigator.serviceWorker.controller.postMessage("sesame-update");
      }
    } else if (kind === "Acked") {
      var form = pending[m.id];
      delete pending[m.id];
      if (!form) return;
      var r = Object.keys(m.result)[0];
      var status = form.querySelector("[data-sesame-status]");
      if (r === "Committed" || r === "Duplicate") {
        form.reset();
        if (status) status.textContent = "Posted.";
      } else if (status) {
        status.textContent = "Not posted: " + (m.result[r].message || r);
      }
      form.querySelectorAll("button").forEach(function (b) { b.disabled = false; });
    } else if (kind === "Error") {
      console.warn("sesame live:", m.code, m.message);
    }
  }

  // The "newer version" notice: the page's own ETag moved.
  function pageTag() {
    return fetch(location.href, { method: "HEAD", cache: "no-store" })
      .then(function (r) { return r.headers.get("etag"); })
      .catch(function () { return null; });
  }
  function checkVersion() {
    pageTag().then(function (tag) {
      if (!loadedTag || !tag || tag === loadedTag) return;
      if (document.getElementById("sesame-newer")) return;
      var note = document.createElement("div");
      note.id = "sesame-newer";
      note.setAttribute("role", "status");
      note.style.cssText = "position:fixed;bottom:1rem;left:50%;transform:translateX(-50%);" +
        "background:#1d1d1f;color:#fff;padding:.6rem 1rem;border-radius:.5rem;font:15px system-ui";
      note.appendChild(document.createTextNode("A newer version of this page is available. "));
      var a = document.createElement("a");
      a.href = location.href; a.textContent = "Reload"; a.style.color = "#8fe3c4";
      note.appendChild(a);
      document.body.appendChild(note);
    });
  }

  // Posting: a new key under the form's prefix, the form's fields as the value.
  function onSubmit(ev) {
    var form = ev.target.closest("form[data-sesame-post]");
    if (!form || !open) return; // without a channel the form posts the usual way
    ev.preventDefault();
    var value = {};
    new FormData(form).forEach(function (v, k) { if (k[0] !== "_") value[k] = String(v); });
    var key = (form.dataset.prefix || "") + Date.now() + "-" + Math.random().toString(36).slice(2, 8);
    var id = ++pushId;
    pending[id] = form;
    if (!form.querySelector("[data-sesame-status]")) {
      var s = document.createElement("p");
      s.setAttribute("data-sesame-status", ""); s.setAttribute("role", "status");
      form.appendChild(s);
    }
    form.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
    send({ Push: { id: id, tx: { site: site, ops: [{ put: {
      collection: form.dataset.sesamePost, key: key, value: value, if_version: 0 } }],
      origin: { client_id: clientId, seq: ++seq } } } });
  }

  function connect() {
    open = false;
    started = performance.now();
    pc = new RTCPeerConnection();
    dc = pc.createDataChannel("sesame");
    dc.onopen = function () {
      dc.send(JSON.stringify({ Hello: { version: PROTOCOL, token: "", client_id: clientId } }));
    };
    dc.onmessage = onMessage;
    dc.onclose = function () { reconnect(); };
    pc.onconnectionstatechange = function () {
      if (pc.connectionState === "failed") reconnect();
    };
    // The offer goes at once, without this browser's candidates: the node is ICE lite at
    // its own address, and the browser's checks to it are all it needs.
    pc.createOffer()
      .then(function (o) { return pc.setLocalDescription(o); })
      .then(function () {
        return fetch("/v1/rtc", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp, site: site })
        });
      })
      .then(function (r) { if (!r.ok) throw new Error("offer refused: " + r.status); return r.json(); })
      .then(function (a) { return pc.setRemoteDescription({ type: "answer", sdp: a.sdp }); })
      .catch(function (e) { console.warn("sesame live:", e); reconnect(); });
  }

  var reconnecting = null;
  function reconnect() {
    open = false;
    // Posts never answered: they may or may not have landed; say so, and free the form.
    Object.keys(pending).forEach(function (id) {
      var form = pending[id];
      delete pending[id];
      var status = form.querySelector("[data-sesame-status]");
      if (status) status.textContent = "The connection was lost before the post was confirmed: check the guestbook before sending it again.";
      form.querySelectorAll("button").forEach(function (b) { b.disabled = false; });
    });
    if (reconnecting) return;
    try { if (pc) pc.close(); } catch (e) { /* already closed */ }
    reconnecting = setTimeout(function () {
      reconnecting = null;
      connect();
    }, retry * (0.5 + Math.random() / 2));
    retry = Math.min(retry * 2, 30000);
  }

  setInterval(function () { send({ Ping: { nonce: Date.now() } }); }, 20000);
  window.addEventListener("pagehide", function () { try { if (pc) pc.close(); } catch (e) { /* gone */ } });
  document.addEventListener("submit", onSubmit);
  pageTag().then(function (tag) { loadedTag = tag; });
  // The service worker, when the page asks for it: pages of one version at a time.
  if (script.hasAttribute("data-sw") && navigator.serviceWorker) {
    var scope = script.dataset.scope || "/" + site + "/";
    navigator.serviceWorker.register("/_sesame/sw.js?site=" + encodeURIComponent(site),
      { scope: scope }).catch(function (e) { console.warn("sesame sw:", e); });
  }
  window.sesameLive = {
    connected: function () { return open; },
    setupMs: function () { return setupMs; },
    clientId: clientId
  };
  connect();
})();
