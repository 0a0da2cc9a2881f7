/* specvm guest library: speculation hypercalls for C programs.
 *
 * Link with the guest-agent static library:
 *   cargo rustc -p guest-agent --features std --release --lib --crate-type staticlib
 * Call specvm_open() once (as root) before the others.
 * Errors are negative: -1 no speculation of this VM's own, -2 unknown
 * operation, -3 bad argument, -4 checkpoint stack full, -5 VMM failure,
 * -6 checkpoint memory budget exhausted (commit or abort first).
 */
#ifndef SPECVM_H
#define SPECVM_H

#ifdef __cplusplus
extern "C" {
#endif

/* Gets access to the hypercall port (ioperm). 0, or -errno. */
int specvm_open(void);
/* 0 now; after a rollback to this checkpoint, returns again with the
 * abort reason (1 = the guest aborted, 2 = the host did, 3 = the bridge
 * refused to start it: its registry could not record it). Negative on error. */
long specvm_speculate(void);
/* Commits the innermost own speculation. 0, or a negative error. */
long specvm_commit(void);
/* Aborts the innermost own speculation; returns only on error. */
long specvm_abort(void);
/* Checkpoints currently held. */
long specvm_depth(void);

#ifdef __cplusplus
}
#endif
#endif
