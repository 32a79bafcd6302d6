// The Agent page's list of waiting calls, refreshed every second without a reload (the server-rendered list
// and its Take buttons work without JavaScript too).
const table = document.getElementById("waiting-calls");

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function render(waiting) {
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const offer of waiting) {
    const row = document.createElement("tr");
    row.dataset.session = offer.session_id;
    cell(row, offer.from);
    cell(row, offer.to);
    cell(row, `${offer.source_language || "auto"} → ${offer.target_language || "auto"}`);
    const why = { agent_lost: " (agent lost)", agent_gave_back: " (given back)" }[offer.reason] || "";
    cell(row, `${offer.seconds_left} s left${why}`);
    const form = document.createElement("form");
    form.method = "post";
    form.action = table.dataset.take.replace("SESSION", encodeURIComponent(offer.session_id));
    const csrf = document.createElement("input");
    Object.assign(csrf, { type: "hidden", name: "csrf_token", value: table.dataset.csrf });
    const button = document.createElement("button");
    Object.assign(button, { type: "submit", className: "take", textContent: "Take call" });
    form.append(csrf, button);
    const last = document.createElement("td");
    last.appendChild(form);
    row.appendChild(last);
    body.appendChild(row);
  }
  document.getElementById("no-waiting").hidden = waiting.length > 0;
}

async function refresh() {
  try {
    const response = await fetch(table.dataset.source, { credentials: "same-origin" });
    if (response.ok) render((await response.json()).waiting);
  } catch (e) { /* the next tick tries again */ }
}

if (table) setInterval(refresh, 1000);
