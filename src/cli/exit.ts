/** Exit codes: 0 ok, 1 conversion error (bad or unsupported input), 2 usage error, 3 verification failure. */
export const EXIT = { ok: 0, error: 1, usage: 2, verify: 3 } as const;
export const EXIT_VERIFY_FAILED = EXIT.verify;
