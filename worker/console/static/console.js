// Quarry console: the run page's live log and sparklines. Plain DOM, no framework.
// Every text from the store goes in through textContent, never as markup.
(function () {
  "use strict";

  var MAX_LINES = 2000; // most log lines the page holds in the DOM at once
  var PAGE = 500; // entries per page read
  var TAIL = "999999999999999999"; // `before` this id: a run's newest entries
  var NEAR = 400; // pixels from an edge that count as "at" it
  var FLUSH_MS = 100; // how long stream entries wait to be drawn together
  var TERMINAL = { run_completed: 1, run_failed: 1, run_cancelled: 1, watchdog_cancelled: 1 };
  var RANK = { debug: 0, info: 1, warning: 2, error: 3 };
  // Controls, C1 controls, line and paragraph separators, bidi overrides: shown as escapes.
  var UNSAFE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

  function visible(text) {
    return String(text == null ? "" : text).replace(UNSAFE, function (c) {
      return "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0");
    });
  }

  function clock(iso) {
    var d = new Date(iso);
    return isNaN(d.getTime()) ? "--:--:--" : d.toTimeString().slice(0, 8);
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401) { var e = new Error("session ended"); e.status = 401; throw e; }
        if (!r.ok) { var f = new Error("HTTP " + r.status); f.status = r.status; throw f; }
        return r.json();
      });
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text != null) node.textContent = text;
    return node;
  }

  // --- the live log -------------------------------------------------------------------------

  function LogView(panel) {
    this.run = panel.dataset.run;
    this.base = "/api/v1/action-runs/" + encodeURIComponent(this.run) + "/logs";
    this.box = document.getElementById("log");
    this.stateEl = document.getElementById("log-state");
    this.level = "";
    this.event = "";
    this.mode = "loading"; // live | loading | detached
    this.oldest = null; // `before` mark of older entries not shown (null: the start is shown)
    this.bottom = null; // detached: `cursor` of newer entries not shown
    this.lastShown = 0; // live: the newest id in the window
    this.buffer = []; // stream entries that arrived while loading
    this.queue = []; // entries waiting for the next frame
    this.pendingNew = 0;
    this.busy = false;
    this.es = null;
    this.ended = false;
    this.received = 0; // stream events taken (for tests and the benchmark)
    this.frame = 0;
    var self = this;
    this.box.addEventListener("scroll", function () { self.onScroll(); }, { passive: true });
    this.box.addEventListener("click", function (ev) { self.onClick(ev); });
    document.getElementById("log-level").addEventListener("change", function (ev) {
      self.level = ev.target.value; self.reload();
    });
    var timer = 0;
    document.getElementById("log-event").addEventListener("input", function (ev) {
      clearTimeout(timer);
      timer = setTimeout(function () { self.event = ev.target.value.trim(); self.reload(); }, 300);
    });
    document.getElementById("log-first-error").addEventListener("click", function () { self.firstError(); });
    document.getElementById("log-latest").addEventListener("click", function () { self.reload(); });
  }

  LogView.prototype.say = function (text) { this.stateEl.textContent = text; };

  LogView.prototype.query = function (extra) {
    var params = new URLSearchParams(extra);
    if (this.level) params.set("level", this.level);
    if (this.event) params.set("event", this.event);
    return this.base + "?" + params.toString();
  };

  LogView.prototype.matches = function (e) {
    if (this.level && RANK[e.level] < RANK[this.level]) return false;
    if (this.event && e.event !== this.event) return false;
    return true;
  };

  LogView.prototype.line = function (e) {
    var row = el("div", "line l-" + e.level);
    row.dataset.id = e.id;
    row.dataset.event = e.event;
    row.appendChild(el("span", "t", clock(e.occurred_at)));
    row.appendChild(document.createTextNode(" ["));
    row.appendChild(el("span", "lv", e.level));
    row.appendChild(document.createTextNode("] "));
    row.appendChild(el("span", "ev", visible(e.event)));
    row.appendChild(document.createTextNode(" - " + visible(e.message)));
    row._data = e.data; // shown on demand
    return row;
  };

  LogView.prototype.fail = function (err) {
    if (err && err.status === 401) { this.endSession(); return; }
    this.say("could not read the log (" + (err && err.message) + "); retrying");
    var self = this;
    setTimeout(function () { self.reload(); }, 2000);
  };

  LogView.prototype.endSession = function () {
    this.ended = true;
    this.sessionEnded = true;
    if (this.es) { this.es.close(); this.es = null; }
    this.say("session ended: sign in again to follow this run");
    document.body.dataset.session = "ended";
  };

  // Open at the tail (also "Follow latest" and a filter change).
  LogView.prototype.reload = function () {
    var self = this;
    this.mode = "loading";
    this.buffer = [];
    this.queue = [];
    this.pendingNew = 0;
    this.say("loading…");
    return getJSON(this.query({ before: TAIL, limit: PAGE })).then(function (page) {
      self.box.replaceChildren();
      var entries = page.entries;
      self.oldest = page.cursor;
      self.append(entries);
      self.lastShown = entries.length ? entries[entries.length - 1].id : 0;
      var start = self.lastShown;
      var opened = start || !(self.level || self.event)
        ? Promise.resolve(start)
        : getJSON(self.base + "?before=" + TAIL + "&limit=1").then(function (p) {
            return p.entries.length ? p.entries[0].id : 0;
          });
      return opened.then(function (after) {
        self.mode = "live";
        var held = self.buffer;
        self.buffer = [];
        self.take(held);
        self.box.scrollTop = self.box.scrollHeight;
        var header = document.getElementById("run-header");
        if (header && header.dataset.terminal === "true") self.ended = true; // nothing follows
        if (!self.es && !self.ended) self.stream(after);
        self.status();
      });
    }).catch(function (err) { self.fail(err); });
  };

  LogView.prototype.status = function () {
    if (this.sessionEnded) return;
    var n = this.box.childElementCount;
    if (this.mode === "detached") {
      this.say(n + " lines shown" + (this.pendingNew ? ", " + this.pendingNew + " new below: Follow latest" : ""));
    } else if (this.es) {
      this.say("live · " + n + " lines shown");
    } else {
      this.say(n + " lines shown · run ended");
    }
  };

  LogView.prototype.append = function (entries) {
    if (!entries.length) return;
    var frag = document.createDocumentFragment();
    for (var i = 0; i < entries.length; i++) frag.appendChild(this.line(entries[i]));
    this.box.appendChild(frag);
  };

  // Drop the oldest lines past the cap; `pinned`: the view is about to jump to the bottom,
  // so the reader's position needs no keeping (and no layout is read for it).
  LogView.prototype.trimTop = function (pinned) {
    var extra = this.box.childElementCount - MAX_LINES;
    if (extra <= 0) return;
    var before = pinned ? 0 : this.box.scrollHeight;
    for (var i = 0; i < extra; i++) this.box.removeChild(this.box.firstElementChild);
    this.oldest = this.box.firstElementChild.dataset.id; // older entries than it exist
    if (!pinned) this.box.scrollTop -= before - this.box.scrollHeight;
  };

  LogView.prototype.trimBottom = function () {
    var extra = this.box.childElementCount - MAX_LINES;
    if (extra <= 0) return;
    for (var i = 0; i < extra; i++) this.box.removeChild(this.box.lastElementChild);
    this.bottom = this.box.lastElementChild.dataset.id;
    this.mode = "detached";
  };

  // Stream entries, in id order; each is taken at most once (ids only grow).
  LogView.prototype.take = function (entries) {
    var fresh = [];
    for (var i = 0; i < entries.length; i++) {
      var e = entries[i];
      if (e.id <= this.lastShown) continue;
      this.lastShown = e.id;
      if (this.matches(e)) fresh.push(e);
    }
    if (!fresh.length) return;
    // One layout read before the change and one write after it: reading sizes between
    // DOM changes forces a layout each time (several a frame at 1,000 lines/s).
    var stick = this.box.scrollHeight - this.box.scrollTop - this.box.clientHeight < NEAR;
    this.append(fresh);
    if (stick) { this.trimTop(true); this.box.scrollTop = 1e9; } // clamped to the bottom
    else if (this.box.childElementCount > MAX_LINES * 1.5) this.trimTop(false);
  };

  LogView.prototype.onEntry = function (e) {
    this.received++;
    if (TERMINAL[e.event]) this.finish();
    if (this.mode === "loading") { this.buffer.push(e); return; }
    if (this.mode === "detached") {
      if (e.id > this.lastShown && this.matches(e)) this.pendingNew++;
      this.lastShown = Math.max(this.lastShown, e.id);
      this.status();
      return;
    }
    this.queue.push(e);
    var self = this;
    if (!this.frame) {
      // Lines land in batches every FLUSH_MS: one layout per batch, not one per frame.
      this.frame = setTimeout(function () {
        self.frame = 0;
        var batch = self.queue;
        self.queue = [];
        if (self.mode === "live") self.take(batch); else Array.prototype.push.apply(self.buffer, batch);
        self.status();
      }, FLUSH_MS);
    }
  };

  LogView.prototype.finish = function () {
    this.ended = true;
    if (this.es) { this.es.close(); this.es = null; }
    this.status();
  };

  LogView.prototype.stream = function (after) {
    var self = this;
    var url = this.base + "/stream" + (after ? "?after=" + after : "");
    var es = new EventSource(url);
    this.es = es;
    es.onopen = function () { self.status(); };
    es.onmessage = function (msg) { self.onEntry(JSON.parse(msg.data)); };
    es.onerror = function () {
      if (self.ended) return;
      var header = document.getElementById("run-header");
      if (header && header.dataset.terminal === "true") { self.finish(); return; }
      if (es.readyState === EventSource.CLOSED) {
        // The server refused the reconnect: a session that ended, or a restart.
        self.es = null;
        getJSON("/api/v1/action-runs/" + encodeURIComponent(self.run)).then(function () {
          // Still signed in: resume after the newest entry taken, as Last-Event-ID would.
          setTimeout(function () { if (!self.es && !self.ended) self.stream(self.lastShown); }, 1000);
        }).catch(function (err) { if (err.status === 401) self.endSession(); });
      } else {
        self.say("reconnecting…"); // the browser resumes with Last-Event-ID
      }
    };
  };

  LogView.prototype.onScroll = function () {
    if (this.busy || this.mode === "loading") return;
    var box = this.box;
    if (box.scrollTop < NEAR && this.oldest) this.older();
    else if (this.mode === "detached" && box.scrollHeight - box.scrollTop - box.clientHeight < NEAR) this.newer();
  };

  LogView.prototype.older = function () {
    var self = this;
    this.busy = true;
    getJSON(this.query({ before: this.oldest, limit: PAGE })).then(function (page) {
      var box = self.box;
      var height = box.scrollHeight;
      var frag = document.createDocumentFragment();
      page.entries.forEach(function (e) { frag.appendChild(self.line(e)); });
      box.insertBefore(frag, box.firstChild);
      box.scrollTop += box.scrollHeight - height; // keep what the reader looks at in place
      self.oldest = page.cursor;
      self.trimBottom();
      self.status();
    }).catch(function (err) { self.fail(err); }).finally(function () { self.busy = false; });
  };

  LogView.prototype.newer = function () {
    var self = this;
    if (!this.bottom) { this.reload(); return; }
    this.busy = true;
    getJSON(this.query({ cursor: this.bottom, limit: PAGE })).then(function (page) {
      self.append(page.entries);
      self.trimTop(false);
      if (page.cursor) { self.bottom = page.cursor; self.status(); }
      else { self.bottom = null; self.reload(); } // caught up: follow live again
    }).catch(function (err) { self.fail(err); }).finally(function () { self.busy = false; });
  };

  LogView.prototype.firstError = function () {
    var self = this;
    getJSON(this.base + "?level=error&limit=1").then(function (page) {
      if (!page.entries.length) { self.say("no errors in this run"); return null; }
      var id = page.entries[0].id;
      return Promise.all([
        getJSON(self.query({ before: String(id + 1), limit: 100 })),
        getJSON(self.query({ cursor: String(id), limit: 200 })),
      ]).then(function (pages) {
        self.mode = "detached";
        self.pendingNew = 0;
        self.box.replaceChildren();
        self.append(pages[0].entries);
        self.append(pages[1].entries);
        self.oldest = pages[0].cursor;
        self.bottom = pages[1].cursor || String(pages[1].entries.length ? pages[1].entries[pages[1].entries.length - 1].id : id);
        var hit = self.box.querySelector('.line[data-id="' + id + '"]');
        if (!hit) { // the filters hide it: show it all the same
          self.level = ""; self.event = "";
          document.getElementById("log-level").value = "";
          document.getElementById("log-event").value = "";
          return self.firstError();
        }
        hit.classList.add("hit");
        hit.scrollIntoView({ block: "center" });
        self.status();
        return null;
      });
    }).catch(function (err) { self.fail(err); });
  };

  LogView.prototype.onClick = function (ev) {
    var row = ev.target.closest(".line");
    if (!row || ev.target.closest("pre")) return;
    var shown = row.querySelector("pre");
    if (shown) { shown.remove(); row.classList.remove("open"); return; }
    var pre = el("pre", "data", visible(JSON.stringify(row._data || {}, null, 2)).replace(/\\u000a/g, "\n"));
    row.appendChild(pre);
    row.classList.add("open");
  };

  // --- sparklines ---------------------------------------------------------------------------

  function Sparks(section) {
    this.url = "/api/v1/action-runs/" + encodeURIComponent(section.dataset.run) + "/telemetry";
    this.boxes = Array.prototype.slice.call(section.querySelectorAll(".spark"));
    this.plots = {};
  }

  Sparks.prototype.series = function (samples) {
    var xs = [], rate = [], bytes = [], progress = [];
    for (var i = 0; i < samples.length; i++) {
      var s = samples[i];
      var t = Date.parse(s.at) / 1000;
      if (isNaN(t)) continue;
      var rows = +s.rows_loaded || 0;
      if (xs.length) {
        var dt = t - xs[xs.length - 1];
        var prev = samples[i - 1];
        rate.push(dt > 0 ? Math.max(rows - (+prev.rows_loaded || 0), 0) / dt : 0);
      } else {
        rate.push(0);
      }
      xs.push(t);
      bytes.push(+s.bytes_loaded || 0);
      progress.push(+s.progress || 0);
    }
    return { x: xs, rate: rate, bytes: bytes, progress: progress };
  };

  Sparks.prototype.draw = function (data) {
    if (typeof uPlot === "undefined") return;
    var self = this;
    this.boxes.forEach(function (box) {
      var key = box.dataset.series;
      var values = [data.x, data[key]];
      box.dataset.points = data.x.length;
      var plot = self.plots[key];
      if (!plot) {
        plot = new uPlot({
          width: Math.max(box.clientWidth, 120),
          height: 80,
          legend: { show: false },
          cursor: { show: false },
          scales: { x: { time: true } },
          axes: [{ show: false }, { show: true, size: 50, ticks: { show: false }, grid: { show: false } }],
          series: [{}, { stroke: "#1f5fbf", fill: "rgba(31,95,191,0.12)", width: 1.5, points: { show: false } }],
        }, values, box);
        self.plots[key] = plot;
      } else {
        plot.setData(values);
      }
    });
  };

  Sparks.prototype.refresh = function () {
    var self = this;
    return getJSON(this.url).then(function (body) { self.draw(self.series(body.samples)); });
  };

  Sparks.prototype.follow = function () {
    var self = this;
    var tick = function () {
      self.refresh().catch(function () {}).finally(function () {
        var header = document.getElementById("run-header");
        var done = header && header.dataset.terminal === "true";
        if (!done) setTimeout(tick, 2000);
        else if (!self.final) { self.final = true; setTimeout(tick, 0); } // the last samples
      });
    };
    tick();
  };

  // --- the page -----------------------------------------------------------------------------

  function start() {
    var panel = document.getElementById("log-panel");
    if (panel) {
      var view = new LogView(panel);
      window.quarryLog = view;
      view.reload();
    }
    var charts = document.getElementById("charts");
    if (charts) {
      var sparks = new Sparks(charts);
      window.quarrySparks = sparks;
      sparks.follow();
    }
    // A fragment refresh refused for an ended session: to the sign-in form.
    document.body.addEventListener("htmx:responseError", function (ev) {
      if (ev.detail.xhr.status === 401) window.location.assign("/signin");
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
