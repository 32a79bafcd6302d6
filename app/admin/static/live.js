/* Live supervisor console: follows /admin/live/events (Server-Sent Events). No inline script, no CDN.
 * Without JavaScript the pages still work: they reload themselves (<noscript> refresh). */
(function () {
  "use strict";

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; } else { node.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { if (c) { node.appendChild(typeof c === "string" ? document.createTextNode(c) : c); } });
    return node;
  }

  function parse(event) {
    try { return JSON.parse(event.data); } catch (e) { return null; }
  }

  function since(epoch) {
    var s = Math.max(0, Math.floor(Date.now() / 1000 - parseFloat(epoch || "0")));
    var m = Math.floor(s / 60), r = s % 60;
    return m + ":" + (r < 10 ? "0" : "") + r;
  }

  /* -- the live list (/admin/live) ---------------------------------------------------------------------- */
  function followList(table) {
    var tbody = table.tBodies[0];
    var empty = document.getElementById("live-empty");

    function rowFor(s) {
      var legs = el("ul", {"class": "changes"}, s.legs.map(function (leg) {
        return el("li", {}, [leg.carrier + " ", el("code", {text: leg.call_id}), " " + (leg.speaker || "") + ": ",
                             el("strong", {text: leg.state}), leg.relay ? ", " + leg.relay : ""]);
      }));
      var form = el("form", {method: "post", action: table.dataset.endUrl.replace("__ID__", s.id)}, [
        el("input", {type: "hidden", name: "csrf_token", value: table.dataset.csrf}),
        el("button", {type: "submit", "class": "danger", "aria-label": "End session " + s.id, text: "End"})]);
      var tr = el("tr", {"data-session": s.id}, [
        el("th", {scope: "row"}, [el("a", {href: table.dataset.sessionUrl.replace("__ID__", s.id)}, [el("code", {text: s.id})]),
                                  el("br"), el("small", {text: s.mode})]),
        el("td", {"class": "duration", "data-since": s.created_at, text: since(s.created_at)}),
        el("td", {text: s.carrier}),
        el("td", {text: (s.from || (s.legs[0] && s.legs[0].from) || "") + " → " + s.to}),
        el("td", {text: s.status}),
        el("td", {}, [legs]),
        el("td", {}, [form])]);
      tr.dataset.receivedAt = String(Date.now());
      return tr;
    }

    function upsert(s) {
      var old = tbody.querySelector('tr[data-session="' + CSS.escape(s.id) + '"]');
      var row = rowFor(s);
      if (old) { tbody.replaceChild(row, old); } else { tbody.insertBefore(row, tbody.firstChild); }
    }

    function refreshEmpty() {
      var none = tbody.querySelectorAll("tr[data-session]").length === 0;
      tbody.querySelectorAll("tr.no-calls").forEach(function (r) { r.hidden = !none; });
      if (empty) { empty.textContent = String(tbody.querySelectorAll("tr[data-session]").length); }
    }

    var source = new EventSource(table.dataset.events);
    source.addEventListener("snapshot", function (e) {
      var sessions = parse(e) || [];
      var keep = {};
      sessions.forEach(function (s) { keep[s.id] = true; upsert(s); });
      tbody.querySelectorAll("tr[data-session]").forEach(function (r) {
        if (!keep[r.dataset.session]) { r.remove(); }
      });
      refreshEmpty();
    });
    source.addEventListener("row", function (e) { var s = parse(e); if (s) { upsert(s); refreshEmpty(); } });
    source.addEventListener("gone", function (e) {
      var s = parse(e);
      var row = s && tbody.querySelector('tr[data-session="' + CSS.escape(s.id) + '"]');
      if (row) { row.remove(); }
      refreshEmpty();
    });
    window.setInterval(function () {
      tbody.querySelectorAll("td.duration[data-since]").forEach(function (td) { td.textContent = since(td.dataset.since); });
    }, 1000);
    document.documentElement.dataset.live = "following";
  }

  /* -- one session (/admin/live/<id>) ------------------------------------------------------------------- */
  function followSession(table) {
    var tbody = table.tBodies[0];
    var maxLines = parseInt(table.dataset.maxLines || "300", 10);
    var empty = document.getElementById("transcript-empty");
    var legs = document.getElementById("live-legs");
    var health = document.getElementById("relay-health");
    var status = document.getElementById("session-status");

    function cell(text, lang) {
      var td = el("td", lang ? {lang: lang} : {}, [text || ""]);
      if (lang) { td.appendChild(document.createTextNode(" ")); td.appendChild(el("small", {text: lang})); }
      return td;
    }

    function transcript(t) {
      var slot = t.item || t.speaker || "";
      var row = el("tr", {"class": (t.final ? "final" : "partial") + " fresh", "data-slot": slot}, [
        el("th", {scope: "row", "class": "speaker speaker-" + (t.speaker || ""), text: t.speaker || ""}),
        cell(t.text, t.language), cell(t.translation, t.translation_language)]);
      row.dataset.receivedAt = String(Date.now());
      row.dataset.eventAt = String(t.at || "");
      // A line with an id replaces its earlier copy (its partials, and the same final relayed by both legs).
      var partial = tbody.querySelector('tr' + (t.item ? '' : '.partial') + '[data-slot="' + CSS.escape(slot) + '"]');
      if (partial) { tbody.replaceChild(row, partial); } else { tbody.appendChild(row); }
      while (tbody.rows.length > maxLines) { tbody.deleteRow(0); }  // bounded however long the call
      if (empty) { empty.hidden = true; }
    }

    function leg(l) {
      if (l.state === "fallback") {  // a note about the call, not a leg state: the legs keep theirs
        legs.appendChild(el("li", {"class": "fallback"}, [el("strong", {text: "fallback used"}),
          l.detail ? el("small", {text: " (" + l.detail + ")"}) : null]));
        return;
      }
      var item = legs.querySelector('li[data-call="' + CSS.escape(l.call_id) + '"]');
      var state = {started: "live", agent_joined: "live", reattached: "live"}[l.state] || l.state;
      var fresh = el("li", {"data-call": l.call_id}, [l.carrier + " ", el("code", {text: l.call_id}),
        " " + (l.speaker || "") + ": ", el("strong", {"class": "leg-state", text: state}),
        l.detail ? el("small", {text: " (" + l.detail + ")"}) : null]);
      if (item) { legs.replaceChild(fresh, item); } else { legs.appendChild(fresh); }
      var live = legs.querySelectorAll("li[data-call] strong.leg-state");
      var anyLive = Array.prototype.some.call(live, function (s) { return s.textContent === "live"; });
      status.textContent = anyLive ? "active" : (l.state === "lost" ? "held" : "ended");
    }

    function relay(h) {
      var none = health.querySelector("li.none");
      if (none) { none.remove(); }
      var item = health.querySelector('li[data-speaker="' + CSS.escape(h.speaker || "") + '"]');
      var lag = (h.playback_lag_ms !== undefined) ? "playback lag " + h.playback_lag_ms + " ms, " :
        (item && item.dataset.lag ? "playback lag " + item.dataset.lag + " ms, " : "");
      var fresh = el("li", {"data-speaker": h.speaker || ""}, [(h.speaker || "") + ": " + lag +
        (h.kallglot_reconnects || 0) + " Kallglot reconnects"]);
      fresh.dataset.lag = h.playback_lag_ms !== undefined ? String(h.playback_lag_ms) : (item ? item.dataset.lag || "" : "");
      if (item) { health.replaceChild(fresh, item); } else { health.appendChild(fresh); }
    }

    var url = table.dataset.events + "&after=" + encodeURIComponent(table.dataset.after || "0-0");
    var source = new EventSource(url);
    source.addEventListener("transcript", function (e) { var t = parse(e); if (t) { transcript(t); } });
    source.addEventListener("leg", function (e) { var l = parse(e); if (l) { leg(l); } });
    source.addEventListener("relay", function (e) { var h = parse(e); if (h) { relay(h); } });
    source.addEventListener("session", function (e) {
      var s = parse(e);
      if (s && s.state === "ended") { status.textContent = "ended"; }
    });
    document.documentElement.dataset.live = "following";
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!window.EventSource) { return; }  // the <noscript>-less fallback: the page keeps its server render
    var list = document.getElementById("live-sessions");
    if (list && list.dataset.events) { followList(list); }
    var transcriptTable = document.getElementById("live-transcript");
    if (transcriptTable && transcriptTable.dataset.events && transcriptTable.dataset.ended !== "1") {
      followSession(transcriptTable);
    }
  });
}());
