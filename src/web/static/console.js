// Scriptorium console: live updates. The pages work without this file.
// Listens to /events (Server-Sent Events) and, when a topic on this page
// moves, fetches the page again and swaps its <main data-live> in place.
// It never inserts text as HTML of its own: the new markup comes from our
// server, already escaped and sanitised, and the CSP forbids inline script.
(function () {
  "use strict";
  var root = document.querySelector("main[data-live]");
  var badge = document.getElementById("live-status");
  if (!root || !window.EventSource || !window.fetch || !window.DOMParser) return;

  var topic = root.getAttribute("data-topic");
  var url = "/events" + (topic ? "?topic=" + encodeURIComponent(topic) : "");
  var timer = null;
  var inflight = false;

  function show(text, cls) {
    if (!badge) return;
    badge.textContent = text;
    badge.className = cls;
  }

  // Do not replace the page under an editor who is typing.
  function editing() {
    var a = document.activeElement;
    if (a && root.contains(a) && /^(TEXTAREA|INPUT|SELECT)$/.test(a.tagName)) return true;
    var fields = root.querySelectorAll("textarea");
    for (var i = 0; i < fields.length; i++) if (fields[i].value) return true;
    return false;
  }

  function refresh() {
    timer = null;
    if (inflight) { schedule(300); return; }
    if (editing()) { show("updates paused while you type", "paused"); schedule(1000); return; }
    inflight = true;
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        inflight = false;
        if (html === null) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.querySelector("main[data-live]");
        if (!fresh) return;
        // Keep open <details> open across the swap.
        var open = {};
        root.querySelectorAll("details[open]").forEach(function (d, i) { open[i] = true; });
        var swapped = document.importNode(fresh, true);
        root.replaceWith(swapped);
        root = swapped;
        root.querySelectorAll("details").forEach(function (d, i) { if (open[i]) d.open = true; });
        show("live", "on");
      })
      .catch(function () { inflight = false; });
  }

  function schedule(ms) {
    if (!timer) timer = setTimeout(refresh, ms);
  }

  var source = new EventSource(url);
  // Catch up on whatever moved between rendering the page and connecting.
  source.onopen = function () { show("live", "on"); schedule(0); };
  source.onerror = function () { show("reconnecting…", "off"); };
  // The list may move many times a second under load: refresh it less often.
  source.onmessage = function () { schedule(topic ? 250 : 1000); };
})();
