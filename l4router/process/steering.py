"""Every connection (and UDP flow) of one source address to one worker.

The supervisor attaches a classic BPF program to each SO_REUSEPORT group
(SO_ATTACH_REUSEPORT_CBPF): the kernel runs it on each new connection's first packet and gives
the connection to the socket at the index it returns. The program hashes the source address
(IPv4: all of it; IPv6: the prefix per-source limits count, `ipv6_source_prefix`), so one
source always reaches the same worker and that worker's per-source count is the whole count:
per-source limits are exact with any number of workers, without sharing anything.
"""

from __future__ import annotations

import ctypes
import socket

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000  # BPF_ABS offsets from here address the network header

# Classic BPF opcodes (linux/filter.h).
LD_B_ABS, LD_W_ABS = 0x30, 0x20
ALU_RSH_K, ALU_AND_K, ALU_MUL_K, ALU_MOD_K, ALU_XOR_X = 0x74, 0x54, 0x24, 0x94, 0xAC
JEQ_K, TAX, RET_A = 0x15, 0x07, 0x16
GOLDEN = 0x9E3779B1  # multiplicative hashing: nearby addresses go to different workers


class _Instruction(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Instruction))]


def _net(offset: int) -> int:
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def _ipv6_masks(prefix: int) -> list[int]:
    """The 32-bit masks of the source address words that hold the first `prefix` bits."""
    masks = []
    for word in range(4):
        bits = max(0, min(32, prefix - 32 * word))
        if bits:
            masks.append((0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF)
    return masks


def source_hash_program(workers: int, ipv6_prefix: int) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions: the socket index for a packet's source address."""
    finish = [
        (ALU_MUL_K, 0, 0, GOLDEN),
        (ALU_RSH_K, 0, 0, 16),
        (ALU_MOD_K, 0, 0, workers),
        (RET_A, 0, 0, 0),
    ]
    ipv4 = [(LD_W_ABS, 0, 0, _net(12))] + finish  # IPv4 source address
    ipv6 = []
    for word, mask in enumerate(_ipv6_masks(ipv6_prefix)):
        load = [(LD_W_ABS, 0, 0, _net(8 + 4 * word)), (ALU_AND_K, 0, 0, mask)]
        ipv6 += load if word == 0 else [(TAX, 0, 0, 0), *load, (ALU_XOR_X, 0, 0, 0)]
    ipv6 += finish
    version = [
        (LD_B_ABS, 0, 0, _net(0)),
        (ALU_RSH_K, 0, 0, 4),
        (JEQ_K, 0, len(ipv4), 4),
    ]  # IPv4 falls through; IPv6 jumps past it
    return version + ipv4 + ipv6


def attach_source_steering(sock: socket.socket, workers: int, ipv6_prefix: int) -> None:
    """Attach the program to the reuseport group of `sock` (any socket of the group).
    OSError where the kernel cannot (before Linux 4.5)."""
    program = source_hash_program(workers, ipv6_prefix)
    instructions = (_Instruction * len(program))(*(_Instruction(*i) for i in program))
    fprog = _Program(len(program), ctypes.cast(instructions, ctypes.POINTER(_Instruction)))
    sock.setsockopt(
        socket.SOL_SOCKET,
        SO_ATTACH_REUSEPORT_CBPF,
        ctypes.string_at(ctypes.addressof(fprog), ctypes.sizeof(fprog)),
    )


__all__ = ["attach_source_steering", "source_hash_program"]
