// Bundle the page into dist/ (served by the gateway): app.js from src/main.ts, plus the HTML
// and CSS as they are. Built by `npm run build` (bin/riffloop test / stack up); never committed.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

mkdirSync("dist", { recursive: true });
await build({
  entryPoints: ["src/main.ts"],
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  sourcemap: true,
  outfile: "dist/app.js",
});
for (const file of ["index.html", "styles.css"]) copyFileSync(`src/${file}`, `dist/${file}`);
console.log("web: built dist/");
