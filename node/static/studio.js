// The studio works without this script; with it, the publish status updates by itself:
// "Your site will update shortly" until the page reflects the save, then when it did.
(function () {
  "use strict";
  var status = document.getElementById("status");
  if (!status || !window.fetch) return;
  var index = Number(status.getAttribute("data-index") || 0);
  if (!index) return;
  var tries = 0;
  function poll() {
    tries += 1;
    fetch("/_studio/status?index=" + index, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (s) {
        if (!s) return;
        status.textContent = s.text;
        if (!s.published && tries < 120) setTimeout(poll, 500);
        else if (s.published && tries < 120) setTimeout(poll, 5000);
      })
      .catch(function () { if (tries < 120) setTimeout(poll, 2000); });
  }
  poll();
})();
