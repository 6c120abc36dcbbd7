// Parse an AsyncAPI document with the official parser and print its diagnostics as JSON.
//   node asyncapi_validate.mjs PARSER_DIR DOCUMENT
// PARSER_DIR is the npm prefix @asyncapi/parser is installed under (tests/harness/asyncapi.py
// installs it). Prints {"parser": version, "diagnostics": [{code, message, path, severity}]}
// where severity is "error", "warning", "information" or "hint"; exits 0 whatever it found
// (the caller judges), 2 when the parser itself cannot run.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";

const SEVERITY = ["error", "warning", "information", "hint"];

const [parserDir, documentPath] = process.argv.slice(2);
if (!parserDir || !documentPath) {
  console.error("usage: node asyncapi_validate.mjs PARSER_DIR DOCUMENT");
  process.exit(2);
}
const require = createRequire(join(resolve(parserDir), "package.json"));
const { Parser } = require("@asyncapi/parser");
const { version } = require("@asyncapi/parser/package.json");

const parser = new Parser();
const text = readFileSync(documentPath, "utf8");
const { diagnostics } = await parser.parse(text, { source: resolve(documentPath) });
const out = diagnostics.map((d) => ({
  code: String(d.code),
  message: d.message,
  path: d.path,
  severity: SEVERITY[d.severity] ?? String(d.severity),
}));
process.stdout.write(JSON.stringify({ parser: version, diagnostics: out }) + "\n");
