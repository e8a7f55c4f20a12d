// node validate.mjs MODULE TYPE [CLASS] < object.json: check one object against the types a
// package generates from its project's schema:
// - by TypeScript on the interface TYPE in strict mode, where an object literal may not carry
//   a property the schema does not declare (a typo such as `minReplicaCont`, which a CRD's
//   validator lets through: CRDs do not forbid unknown fields), and
// - given CLASS (a @kubernetes-models class), at run time by its validator (types, required
//   fields, enums, formats, patterns).
// KEDA: @kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject IScaledObject ScaledObject.
// Grafana: @grafana/schema Dashboard (the dashboard schema Grafana's own code is typed with).
// Prints what is wrong, exit 1.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const [module, type, name] = process.argv.slice(2);
const data = JSON.parse(readFileSync(0, "utf8"));
const problems = [];

if (name) {
  const Model = (await import(module))[name];
  try {
    new Model(data).validate();
  } catch (error) {
    problems.push(`schema: ${error.message}`);
  }
}

const here = dirname(fileURLToPath(import.meta.url));
const checks = join(here, ".checks");
mkdirSync(checks, { recursive: true });
const file = join(checks, `${type}-${process.pid}.mts`);
writeFileSync(
  file,
  `import type { ${type} } from "${module}";\n` +
    `export const object: ${type} = ${JSON.stringify(data, null, 2)};\n`,
);
try {
  const program = ts.createProgram([file], {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
  });
  for (const d of ts.getPreEmitDiagnostics(program)) {
    const text = ts.flattenDiagnosticMessageText(d.messageText, "\n");
    const where = d.file && d.start !== undefined ? near(d.file.text, d.start) : "";
    problems.push(`type: ${text}${where}`);
  }
} finally {
  rmSync(file, { force: true });
}
function near(text, start) {
  const line = text.slice(0, start).split("\n").length;
  return ` (at: ${text.split("\n")[line - 1].trim()})`;
}

if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
