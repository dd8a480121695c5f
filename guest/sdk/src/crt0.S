/*
 * cowvm SDK crt0 (guest ABI v1). The VMM enters _start in long mode at ring 0 with its own small
 * stack; we switch to the SDK's stack, initialise, report ready() (the template point), then serve
 * calls forever. Guest RAM starts zeroed, so .bss is not cleared here (every instruction is
 * emulated on hosts without hardware virtualisation; clearing 64 KiB would cost milliseconds).
 */
    .intel_syntax noprefix
    .set PORT_HYPERCALL, 0xf2
    .set HC_LOG, 1
    .set HC_READY, 2
    .set HC_DONE, 3
    .set HC_ABORT, 4

    .section .text.entry, "ax"
    .globl _start
_start:
    lea rsp, [rip + __stack_top]
    xor ebp, ebp
    call cowvm_init
    test eax, eax
    jz 1f
    mov edi, eax
    call cowvm_abort
1:  call cowvm__after_init
    call cowvm_ready
2:  call cowvm__call_once      /* eax = status */
    mov edi, eax
    call cowvm_done
    jmp 2b

    .text
/* void cowvm_log(const void *ptr, size_t len): rdi, rsi are already the arguments. */
    .globl cowvm_log
cowvm_log:
    mov eax, HC_LOG
    out PORT_HYPERCALL, eax
    ret

/* void cowvm_ready(void). The VMM hands a clone its identity in r14 / r15 when it resumes here;
   they are callee-saved, so keep the caller's values. */
    .globl cowvm_ready
cowvm_ready:
    push r14
    push r15
    mov eax, HC_READY
    out PORT_HYPERCALL, eax
    pop r15
    pop r14
    ret

/* void cowvm_done(uint32_t status): returns when the VMM starts the next call. The VMM hands out
   a new identity only at ready() (a clone start or reset), so r14 / r15 need no saving here. */
    .globl cowvm_done
cowvm_done:
    mov eax, HC_DONE
    out PORT_HYPERCALL, eax
    ret

/* void cowvm_abort(uint32_t code): never returns. */
    .globl cowvm_abort
cowvm_abort:
    mov eax, HC_ABORT
    out PORT_HYPERCALL, eax
    cli
3:  hlt
    jmp 3b

    .section .note.GNU-stack, "", @progbits
