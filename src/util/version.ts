/** The tool version recorded in outputs and printed by --version (kept equal to package.json by a test). */
export const VERSION = '0.1.0';
