// The upload page: files chosen from the picker or dropped on the page wait for the Upload button,
// then go in batches, one request each, with one progress bar for the whole upload (its speed and
// the time left) and a Cancel button. The server's answers become one summary row per study
// (patient, study, files stored / already there / refused, a link to it), with every file's row
// folded below. Without this script the form posts normally and the page comes back with the same
// tables. No inline code: the page's content security policy forbids it.
(function () {
  "use strict";

  var form = document.getElementById("upload-form");
  if (!form) {
    return;
  }
  var input = document.getElementById("upload-files");
  var zone = document.getElementById("drop-zone");
  var submit = document.getElementById("upload-submit");
  var cancel = document.getElementById("upload-cancel");
  var chosenText = document.getElementById("upload-chosen");
  var progressBlock = document.getElementById("upload-progress");
  var bar = document.getElementById("upload-bar");
  var statusText = document.getElementById("upload-status");
  var batches = document.getElementById("upload-batches");
  var maxBytes = Number(form.dataset.maxBytes);
  var token = form.querySelector("input[name=csrf_token]").value;
  var BATCH_FILES = 50;
  var BATCH_BYTES = Math.min(maxBytes, 64 * 1024 * 1024);
  var OUTCOMES = {
    stored: "stored",
    duplicate: "already in the archive",
    refused: "refused",
    skipped: "skipped",
    scheduled: "scheduled",
    replaced: "replaced",
    cancelled: "cancelled"
  };

  var chosen = [];
  var run = null; // the upload in progress: its queue, request, counts and output

  function size(bytes) {
    if (bytes < 1000 * 1000) {
      return Math.ceil(bytes / 1000) + " kB";
    }
    if (bytes < 1000 * 1000 * 1000) {
      return (bytes / 1000 / 1000).toFixed(1) + " MB";
    }
    return (bytes / 1000 / 1000 / 1000).toFixed(2) + " GB";
  }

  function duration(seconds) {
    if (seconds < 60) {
      return Math.max(1, Math.round(seconds)) + " s";
    }
    if (seconds < 3600) {
      return Math.round(seconds / 60) + " min";
    }
    return Math.floor(seconds / 3600) + " h " + Math.round((seconds % 3600) / 60) + " min";
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function table(className, headings) {
    var made = element("table", "grid " + className);
    var head = element("thead");
    var headRow = element("tr");
    headings.forEach(function (label) { headRow.appendChild(element("th", "", label)); });
    head.appendChild(headRow);
    made.appendChild(head);
    made.appendChild(element("tbody"));
    return made;
  }

  function showChosen() {
    var bytes = chosen.reduce(function (total, file) { return total + file.size; }, 0);
    chosenText.textContent = chosen.length
      ? chosen.length + (chosen.length === 1 ? " file" : " files") + " (" + size(bytes) + ") chosen: press Upload to send them."
      : "";
    submit.disabled = !chosen.length || run !== null;
  }

  function choose(fileList) {
    Array.prototype.forEach.call(fileList, function (file) { chosen.push(file); });
    showChosen();
  }

  // ---- one upload: its output ----

  function output() {
    var block = element("div", "upload-batch");
    var counts = element("p", "upload-counts");
    var studies = table("fits upload-studies", ["Patient", "Study", "Date", "Accession", "Files", ""]);
    studies.hidden = true;
    var folded = element("details", "upload-files");
    var summary = element("summary", "", "Every file (0)");
    folded.appendChild(summary);
    var files = table("upload-results", ["File", "Result", "Details"]);
    folded.appendChild(files);
    block.appendChild(counts);
    block.appendChild(studies);
    block.appendChild(folded);
    batches.insertBefore(block, batches.firstChild);
    return { counts: counts, studies: studies, studyRows: {}, summary: summary, files: files, fileCount: 0 };
  }

  function fileRow(shown, name, outcome, detail) {
    var tr = element("tr", "upload-" + outcome);
    tr.appendChild(element("td", "", name));
    tr.appendChild(element("td", "", OUTCOMES[outcome] || outcome));
    tr.appendChild(element("td", "", detail || ""));
    shown.files.tBodies[0].appendChild(tr);
    shown.fileCount += 1;
    shown.summary.textContent = "Every file (" + shown.fileCount + ")";
  }

  function studyRow(shown, study) {
    var known = shown.studyRows[study.study_instance_uid];
    if (!known) {
      var tr = element("tr");
      known = { row: tr, cells: {}, stored: 0, duplicate: 0, refused: 0 };
      ["patient", "description", "date", "accession_number", "counts", "link"].forEach(function (name) {
        known.cells[name] = element("td", name === "date" ? "when" : name === "counts" ? "counts" : "");
        tr.appendChild(known.cells[name]);
      });
      shown.studies.tBodies[0].appendChild(tr);
      shown.studies.hidden = false;
      shown.studyRows[study.study_instance_uid] = known;
    }
    // A study whose files came in several batches: its counts add up, the archive's words win.
    known.stored += study.stored;
    known.duplicate += study.duplicate;
    known.refused += study.refused;
    ["patient", "description", "date", "accession_number"].forEach(function (name) {
      if (study[name]) {
        known.cells[name].textContent = study[name];
      }
    });
    var counts = known.cells.counts;
    counts.textContent = "";
    counts.appendChild(element("span", "", known.stored + " stored"));
    counts.appendChild(element("span", "", known.duplicate + " already there"));
    counts.appendChild(element("span", "", known.refused + " refused"));
    if (study.url && !known.cells.link.firstChild) {
      var link = element("a", "", "Open the study");
      link.href = study.url;
      known.cells.link.appendChild(link);
    }
  }

  function showCounts() {
    var parts = [];
    Object.keys(OUTCOMES).forEach(function (name) {
      if (run.counts[name]) {
        parts.push(run.counts[name] + " " + OUTCOMES[name]);
      }
    });
    run.shown.counts.textContent = parts.join(" · ");
  }

  function refuseAll(files, message) {
    files.forEach(function (file) {
      run.counts.refused = (run.counts.refused || 0) + 1;
      fileRow(run.shown, file.name, "refused", message);
    });
    showCounts();
  }

  // ---- one upload: sending ----

  function showProgress(loadedNow) {
    var sent = run.sentBytes + loadedNow;
    var elapsed = (Date.now() - run.started) / 1000;
    var text = "Sending " + size(sent) + " of " + size(run.totalBytes);
    bar.value = run.totalBytes ? Math.min(99, (sent / run.totalBytes) * 100) : 0;
    if (elapsed >= 1 && sent > 0) {
      var speed = sent / elapsed;
      text += " · " + size(speed) + "/s";
      if (sent < run.totalBytes) {
        text += " · about " + duration((run.totalBytes - sent) / speed) + " left";
      }
    }
    statusText.textContent = text;
  }

  function answered(batch, xhr) {
    var answer = null;
    try {
      answer = JSON.parse(xhr.responseText);
    } catch (error) {
      answer = null;
    }
    if (xhr.status === 200 && answer && answer.results) {
      answer.results.forEach(function (result) {
        fileRow(run.shown, result.name, result.outcome, result.detail || result.patient);
      });
      (answer.studies || []).forEach(function (study) { studyRow(run.shown, study); });
      Object.keys(answer.counts).forEach(function (name) {
        run.counts[name] = (run.counts[name] || 0) + answer.counts[name];
      });
      showCounts();
    } else if (xhr.status === 413) {
      refuseAll(batch.files, "Too large: this server accepts at most " + size(maxBytes) + " per upload.");
    } else if (answer && answer.message) {
      refuseAll(batch.files, answer.message);
    } else if (xhr.status === 0) {
      refuseAll(batch.files, "The connection was lost; nothing is known about these files. Please send them again.");
    } else {
      refuseAll(batch.files, "The server answered " + xhr.status + "; please send these files again.");
    }
  }

  function finish(text) {
    bar.value = 100;
    statusText.textContent = text;
    cancel.hidden = true;
    run = null;
    showChosen();
  }

  function sendNext() {
    if (run.cancelled) {
      return;
    }
    var batch = run.queue.shift();
    if (!batch) {
      var seconds = (Date.now() - run.started) / 1000;
      finish("Done: " + size(run.totalBytes) + " in " + duration(seconds) + ".");
      return;
    }
    var data = new FormData();
    data.append("csrf_token", token);
    batch.files.forEach(function (file) { data.append("files", file, file.name); });
    var xhr = new XMLHttpRequest();
    run.request = xhr;
    run.batch = batch;
    run.storing = false;
    xhr.open("POST", form.action);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRFToken", token);
    xhr.upload.addEventListener("progress", function (event) {
      if (event.lengthComputable && !run.cancelled) {
        // The body is a little larger than the files (the form's parts): count the files' share.
        showProgress(Math.min(batch.bytes, event.loaded * (batch.bytes / Math.max(event.total, 1))));
      }
    });
    xhr.upload.addEventListener("load", function () {
      if (!run.cancelled) {
        run.storing = true;
        statusText.textContent = "The archive is checking and storing " + batch.files.length + (batch.files.length === 1 ? " file…" : " files…");
      }
    });
    xhr.addEventListener("load", function () {
      answered(batch, xhr);
      run.sentBytes += batch.bytes;
      sendNext();
    });
    xhr.addEventListener("error", function () {
      answered(batch, xhr);
      run.sentBytes += batch.bytes;
      sendNext();
    });
    xhr.send(data);
  }

  function start() {
    if (!chosen.length || run !== null) {
      return;
    }
    var files = chosen;
    chosen = [];
    input.value = "";
    run = {
      queue: [],
      counts: {},
      shown: output(),
      started: Date.now(),
      sentBytes: 0,
      totalBytes: 0,
      request: null,
      batch: null,
      storing: false,
      cancelled: false
    };
    var current = { files: [], bytes: 0 };
    function close() {
      if (current.files.length) {
        run.queue.push(current);
        current = { files: [], bytes: 0 };
      }
    }
    files.forEach(function (file) {
      if (file.size > maxBytes) {
        refuseAll([file], "Too large: this server accepts at most " + size(maxBytes) + " per upload.");
        return;
      }
      if (current.files.length >= BATCH_FILES || current.bytes + file.size > BATCH_BYTES) {
        close();
      }
      current.files.push(file);
      current.bytes += file.size;
      run.totalBytes += file.size;
    });
    close();
    progressBlock.hidden = false;
    bar.value = 0;
    statusText.textContent = "Sending…";
    cancel.hidden = false;
    showChosen();
    sendNext();
  }

  function stop() {
    if (!run) {
      return;
    }
    run.cancelled = true;
    var waiting = run.queue.reduce(function (all, batch) { return all.concat(batch.files); }, []);
    run.queue = [];
    var storing = run.storing;
    if (run.request) {
      run.request.abort();
    }
    var shown = run.shown;
    // Whatever of the current batch had not all arrived is not stored (the portal keeps nothing of
    // an upload that did not arrive whole); once it had, the archive may have stored some of it.
    var text = storing
      ? "Cancelled while the archive was storing the last files sent: some of them may be stored (sending them again is safe)."
      : "Cancelled: the files not yet sent were not stored.";
    if (run.batch) {
      run.batch.files.forEach(function (file) {
        fileRow(shown, file.name, storing ? "refused" : "cancelled", storing
          ? "cancelled while the archive stored it: it may be stored; sending it again is safe"
          : "not stored: the upload was cancelled while it was sent");
      });
    }
    waiting.forEach(function (file) { fileRow(shown, file.name, "cancelled", "not sent: the upload was cancelled"); });
    finish(text);
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (input.files.length && !chosen.length) {
      choose(input.files);
    }
    start();
  });
  cancel.addEventListener("click", stop);
  input.addEventListener("change", function () {
    if (input.files.length) {
      choose(input.files);
      input.value = "";
    }
  });
  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (event) {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function () { zone.classList.remove("dragging"); });
  });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      choose(event.dataTransfer.files);
    }
  });
  showChosen();
}());
