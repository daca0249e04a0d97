/* global module */
/**
 * The layering of src/ (docs/design.md, "Floors"): each folder is one floor and imports only go
 * down — never up, never sideways into a floor of the same height, and never in a circle. `npm run
 * lint` and the test command run this check.
 */
// Lowest first. A floor may import any floor before it in this list (and itself).
const FLOORS = [
  ['util'],
  ['io'],
  ['tensor'],
  ['pickle', 'hub'],
  ['lazy'],
  ['exec'],
  ['formats'],
  ['megatron'],
  ['checkpoints'],
  ['models'],
  ['bridge'],
  ['nxd'],
  // forward (the reference forward passes of verify --logits) sits beside lora, above the NxD file
  // layer it reads rank files with; the rule below keeps the mappings it checks out of its reach.
  ['lora', 'forward'],
  ['plan'],
  ['steps', 'cluster'],
  ['cli'],
];

const above = (i) => FLOORS.slice(i + 1).flat();
const sameHeight = (folder, i) => FLOORS[i].filter((f) => f !== folder);

module.exports = {
  forbidden: [
    {
      name: 'no-circular',
      severity: 'error',
      comment: 'An import circle: two modules that need each other belong together, or a third one is missing.',
      from: { path: '^src/' },
      to: { circular: true },
    },
    ...FLOORS.flatMap((folders, i) =>
      folders.map((folder) => ({
        name: `${folder}-imports-only-down`,
        severity: 'error',
        comment: `src/${folder}/ may import only the floors below it (.dependency-cruiser.cjs FLOORS).`,
        from: { path: `^src/${folder}/` },
        to: { path: `^src/(${[...above(i), ...sameHeight(folder, i), 'index\\.ts$'].join('|')})` },
      })),
    ),
    {
      name: 'forward-independent-of-mapping',
      severity: 'error',
      comment: 'The reference forward reads each format by its own semantics; the TP split and the legacy assembly are conversion code (issue 23).',
      from: { path: '^src/forward/' },
      to: { path: '^src/(megatron/(parallel|legacy)|nxd/layout|bridge|models|lora)' },
    },
    {
      name: 'src-imports-no-tests',
      severity: 'error',
      from: { path: '^src/' },
      to: { path: '^(test|bench|scripts)/' },
    },
    {
      name: 'no-unknown-floor',
      severity: 'error',
      comment: 'A folder of src/ that is not in FLOORS: add it there, at its height.',
      from: { path: `^src/(?!(${FLOORS.flat().join('|')})/)[^/]+/` },
      to: {},
    },
    {
      name: 'no-root-modules',
      severity: 'error',
      comment: 'src/index.ts (the library entry) is the only module outside a floor, and nothing imports it.',
      from: { path: '^src/[^/]+\\.ts$', pathNot: '^src/index\\.ts$' },
      to: {},
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    tsConfig: { fileName: 'tsconfig.json' },
    tsPreCompilationDeps: true,
    exclude: { path: '^(dist|node_modules)/' },
  },
};
