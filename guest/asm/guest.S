/*
 * cowvm's guest kernel. The VMM enters _start in 64-bit long mode with identity page tables and
 * a command in the registers (see src/protocol.rs). Every instruction is emulated on hosts without
 * hardware virtualisation, so each path is a handful of instructions and the loops are one load or
 * one store per element. The guest never uses its stack and never writes memory except where a
 * command tells it to, so a clone that only runs commands that read copies no page.
 *
 * Every vCPU enters _start in the same state except for its stack and its GS base, which the VMM
 * sets to the vCPU's index; each vCPU runs this command loop on its own. Nothing here is shared
 * between vCPUs but the code, so they need no locks.
 */
    .intel_syntax noprefix
    .include "protocol.inc"

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
dispatch:
    cmp rax, CMD_EXIT
    je ok
    cmp rax, CMD_WRITE
    je write_qwords
    cmp rax, CMD_CHECKSUM
    je checksum_qwords
    cmp rax, CMD_IDENTITY
    je identity
    cmp rax, CMD_TRIPLE_FAULT
    je triple_fault
    cmp rax, CMD_SPIN
    je spin
    cmp rax, CMD_HALT
    je halt
    mov eax, STATUS_UNKNOWN_COMMAND
    jmp report
ok:
    xor eax, eax                /* STATUS_OK */
report:
    out PORT_DONE, eax          /* exits to the VMM, which loads the next command */
    jmp dispatch

/* The loops count in rcx with `loop`: KVM emulates every guest instruction on some hosts, so
   each instruction saved per qword is a fixed share of a command's time. rcx is given back as
   it came (the VMM reports it as `extra`). */

/* rdi = first address, rsi = count, rdx = stride, rcx = value */
write_qwords:
    mov rax, rcx
    mov rcx, rsi
    jrcxz 2f
1:  mov [rdi], rax
    add rdi, rdx
    loop 1b
2:  mov rcx, rax
    jmp ok

/* rdi = first address, rsi = count, rdx = stride; rbx = checksum (rotate, then add) */
checksum_qwords:
    xor ebx, ebx
    mov rax, rcx
    mov rcx, rsi
    jrcxz 2f
1:  rol rbx, CHECKSUM_ROTATE
    add rbx, [rdi]
    add rdi, rdx
    loop 1b
2:  mov rcx, rax
    jmp ok

/* rbx = generation id (r14), rcx = seed (r15), rdx = this vCPU's index, read from its GS base */
identity:
    mov ecx, MSR_VCPU_ID
    rdmsr                       /* edx:eax = GS base */
    shl rdx, 32
    or rdx, rax
    mov rbx, r14
    mov rcx, r15
    jmp ok

triple_fault:
    lidt [rip + empty_idtr]
    ud2

spin:
    jmp spin

halt:
    cli
    hlt
    jmp ok

    .section .rodata
    .balign 16
empty_idtr:
    .word 0
    .quad 0
