/**
 * The JavaScript heap a conversion's plan occupies, so the executor can size its buffers to what
 * the memory budget leaves (the budget covers the plan and the tensor buffers together).
 *
 * V8 collects garbage lazily: planning a 75,000-tensor checkpoint leaves a few hundred MB of
 * dead objects that would otherwise stay resident through the whole run, beside the arena. One
 * full collection between planning and executing returns them to the OS and tells how much is
 * really live. `gc` is only exposed with `--expose-gc`; setting the flag at run time and fetching
 * the function from a fresh context is the documented way for a program to get it (node docs,
 * `v8.setFlagsFromString`).
 */
import v8 from 'node:v8';
import vm from 'node:vm';

let gc: (() => void) | undefined;

/** Runs a full garbage collection and returns the live JavaScript heap in bytes. */
export function liveHeapBytes(): number {
  if (!gc) {
    v8.setFlagsFromString('--expose-gc');
    gc = vm.runInNewContext('gc') as () => void;
  }
  gc();
  return process.memoryUsage().heapUsed;
}
