// Renders /openapi.json as a page: one section per operation with its
// parameters, body and answers. Plain DOM and textContent only.
"use strict";

const el = (tag, text, cls) => {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
};

function row(cells, tag = "td") {
  const tr = el("tr");
  for (const c of cells) tr.append(el(tag, c));
  return tr;
}

function schemaName(s) {
  if (!s) return "";
  if (s.$ref) return s.$ref.split("/").pop();
  if (s.type === "array") return `[${schemaName(s.items)}]`;
  return Array.isArray(s.type) ? s.type.join(" | ") : (s.type || "");
}

function operation(path, method, op) {
  const sec = el("section");
  sec.id = `${method}-${path}`;
  sec.append(el("h2", `${method.toUpperCase()} ${path}`));
  if (op.description || op.summary) sec.append(el("p", op.description || op.summary));
  const secured = (op.security || []).some((s) => Object.keys(s).length > 0);
  const anonymous = (op.security || []).some((s) => Object.keys(s).length === 0);
  if (secured) sec.append(el("p", anonymous ? "Credential: a key or the admin token when auth.required; optional otherwise." : "Credential: the admin token.", "note"));
  if (op.parameters && op.parameters.length) {
    const t = el("table");
    t.append(row(["parameter", "in", "type", ""], "th"));
    for (const p of op.parameters) t.append(row([p.name, p.in, schemaName(p.schema), p.description || ""]));
    sec.append(t);
  }
  if (op.requestBody) {
    const kinds = Object.entries(op.requestBody.content || {}).map(([ct, c]) => `${ct} ${schemaName(c.schema)}`);
    sec.append(el("p", `Body: ${kinds.join(", ")}. ${op.requestBody.description || ""}`));
  }
  const t = el("table");
  t.append(row(["status", "answer"], "th"));
  for (const [code, r] of Object.entries(op.responses || {})) {
    const body = Object.values(r.content || {}).map((c) => schemaName(c.schema)).filter(Boolean).join(", ");
    t.append(row([code, [r.description, body].filter(Boolean).join(" — ")]));
  }
  sec.append(t);
  return sec;
}

async function main() {
  const doc = await (await fetch("/openapi.json")).json();
  document.getElementById("intro").textContent = doc.info.description || "";
  const toc = document.getElementById("toc");
  const ops = document.getElementById("ops");
  const list = el("ul");
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const a = el("a", `${method.toUpperCase()} ${path}`);
      a.href = `#${method}-${path}`;
      const li = el("li");
      li.append(a);
      list.append(li);
      ops.append(operation(path, method, op));
    }
  }
  toc.append(list);
  document.getElementById("status").textContent = `${doc.info.title} ${doc.info.version}`;
}

main().catch((e) => { document.getElementById("status").textContent = `could not load /openapi.json: ${e}`; });
