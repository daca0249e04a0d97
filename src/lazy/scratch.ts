/**
 * Reusable temporaries for the few expressions that need one outside the executor's arena (a cast
 * produced by `produceBox` for verify, diff or library use): a handful of the largest recent
 * buffers are kept rather than allocated per box.
 */
const scratch: Uint8Array[] = [];
const SCRATCH_KEEP = 4;

export function takeScratch(n: number): Uint8Array {
  const i = scratch.findIndex((b) => b.length >= n);
  const b = i >= 0 ? scratch.splice(i, 1)[0]! : new Uint8Array(n);
  return b.subarray(0, n);
}

export function giveScratch(b: Uint8Array): void {
  const whole = new Uint8Array(b.buffer, 0, b.buffer.byteLength);
  if (scratch.length < SCRATCH_KEEP) scratch.push(whole);
  else {
    // Keep the largest few.
    scratch.sort((x, y) => x.length - y.length);
    if (scratch[0]!.length < whole.length) scratch[0] = whole;
  }
}
