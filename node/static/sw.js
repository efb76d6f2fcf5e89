// Sesame service worker: serves a site's pages from one published version at a time, so
// navigating never mixes two versions, and keeps visited pages for offline use.
//
// Registered by live.js (`<script src="/_sesame/live.js" data-site="SITE" data-sw>`) with
// the site's scope. It keeps the version it serves (a manifest: path -> content hash) and
// the files it has seen, by hash. When the node publishes a newer version, it fetches the
// files that changed (the delta between the two manifests) first, then moves to the new
// version at once; until then every page comes from the old one.
"use strict";

var SITE = new URL(self.location).searchParams.get("site");
var FILES = "sesame-files-" + SITE;   // content hash -> response
var META = "sesame-meta-" + SITE;     // the manifest served now
var CHECK_EVERY_MS = 3000;
var current = null;                   // {index, files: {path: {hash, content_type}}}
var pinned = {};                      // client (page) id -> the version it was loaded from
var lastCheck = 0;
var moving = null;

function scopePath(url) {
  var scope = new URL(self.registration.scope).pathname;
  if (url.pathname.indexOf(scope) !== 0) return null;
  var p = "/" + url.pathname.slice(scope.length);
  return p.length > 1 && p[p.length - 1] === "/" ? p.slice(0, -1) : p;
}

function saved() {
  if (current) return Promise.resolve(current);
  return caches.open(META)
    .then(function (c) { return c.match("manifest"); })
    .then(function (r) { return r ? r.json() : null; })
    .then(function (m) { if (m && !current) current = m; return current; });
}

// `path` is a page the file is served at: the node answers with its content type.
function fetchFile(hash, path) {
  return caches.open(FILES).then(function (cache) {
    return cache.match(hash).then(function (hit) {
      if (hit) return hit;
      var url = "/_sesame/blob/" + SITE + "/" + hash + "?path=" + encodeURIComponent(path);
      return fetch(url).then(function (r) {
        if (!r.ok) throw new Error("file " + hash + ": " + r.status);
        return cache.put(hash, r.clone()).then(function () { return r; });
      });
    });
  });
}

// Moves to the newest published version once every file it changed is here.
function update() {
  if (moving) return moving;
  lastCheck = Date.now();
  moving = fetch("/_sesame/manifest/" + SITE, { cache: "no-store" })
    .then(function (r) { if (!r.ok) throw new Error("manifest: " + r.status); return r.json(); })
    .then(function (next) {
      return saved().then(function (cur) {
        if (cur && cur.index >= next.index) return cur;
        // The delta: what the new version changed (or everything, the first time).
        var wanted = Object.keys(next.files).filter(function (p) {
          return !cur || !cur.files[p] || cur.files[p].hash !== next.files[p].hash;
        }).filter(function (p) {
          // Fetch ahead the pages already visited; others come when asked for.
          return cur && cur.files[p] && visited[p];
        });
        return Promise.all(wanted.map(function (p) { return fetchFile(next.files[p].hash, p); }))
          .then(function () {
            current = next;
            return caches.open(META).then(function (c) {
              return c.put("manifest", new Response(JSON.stringify(next),
                { headers: { "content-type": "application/json" } }));
            });
          })
          .then(function () { return next; });
      });
    })
    .catch(function () { return current; }) // offline: keep serving what we have
    .then(function (m) { moving = null; return m; });
  return moving;
}

var visited = {};

self.addEventListener("install", function (e) { self.skipWaiting(); });
self.addEventListener("activate", function (e) { e.waitUntil(self.clients.claim().then(update)); });

self.addEventListener("fetch", function (event) {
  var req = event.request;
  if (req.method !== "GET") return;
  var url = new URL(req.url);
  if (url.origin !== self.location.origin) return;
  // `?v=<hash>` (what the template function asset_url() writes) names the content of the
  // file at the path, not another resource: it is served from the version like the bare
  // path, when that version's file is that content. Other queries go to the node.
  var version = "";
  if (url.search) {
    var v = /^\?v=([0-9a-f]{16,64})$/.exec(url.search);
    if (!v) return;
    version = v[1];
  }
  var path = scopePath(url);
  if (path === null) return;
  var navigate = req.mode === "navigate";
  event.respondWith(
    saved()
      .then(function (m) {
        if (!m) return update();
        // A page's own files (stylesheets, images) come from the version the page came
        // from, whatever has been published since.
        if (!navigate && pinned[event.clientId]) return pinned[event.clientId];
        if (navigate && Date.now() - lastCheck > CHECK_EVERY_MS) update(); // in the background
        return m;
      })
      .then(function (m) {
        if (navigate && event.resultingClientId) {
          pinned[event.resultingClientId] = m;
          forgetGoneClients();
        }
        return serve(m, path, req, version);
      })
      .catch(function () { return fetch(req); })
  );
});

// Pins of pages that are gone are dropped (a few at a time, as pages come and go).
function forgetGoneClients() {
  self.clients.matchAll({ includeUncontrolled: true }).then(function (list) {
    var alive = {};
    list.forEach(function (c) { alive[c.id] = true; });
    Object.keys(pinned).forEach(function (id) { if (!alive[id]) delete pinned[id]; });
  });
}

function serve(m, path, req, version) {
  var at = m && (m.files[path] ? path : path + "/");
  var f = m && m.files[at];
  if (!f || (version && f.hash.indexOf(version) !== 0)) return fetch(req);
  visited[path] = true;
  return fetchFile(f.hash, at).then(function (r) {
    var headers = new Headers(r.headers);
    headers.set("content-type", f.content_type);
    headers.set("sesame-version", String(m.index));
    // The worker is the cache: the browser's own must not keep a file past its version.
    headers.set("cache-control", "no-cache");
    return new Response(r.body, { status: 200, headers: headers });
  });
}

self.addEventListener("message", function (e) {
  if (e.data === "sesame-update") e.waitUntil(update());
});
