"""A register-level stand-in for the MFRC522 and for the ISO/IEC 14443 A card in its field.

It answers the SPI transfers of firmware_bridges/esp32/mfrc522.py the way the datasheet describes the chip:
registers, the 64-byte FIFO, the CRC coprocessor, Transceive started by StartSend, RxIRq on an answer and
TimerIRq on silence; and the card follows ISO/IEC 14443-3 (IDLE, READY, ACTIVE, HALT; WUPA, anticollision
and select per cascade level, HLTA). It checks the driver against this reading of the documents, not against
silicon: timing, antenna, noise and clones are for real hardware to show.
"""

from __future__ import annotations

COMMAND, COM_IRQ, DIV_IRQ, ERROR = 0x01, 0x04, 0x05, 0x06
FIFO_DATA, FIFO_LEVEL, CONTROL, BIT_FRAMING = 0x09, 0x0A, 0x0C, 0x0D
CRC_RESULT_H, CRC_RESULT_L, VERSION = 0x21, 0x22, 0x37
IDLE, CALC_CRC, TRANSCEIVE, SOFT_RESET = 0x00, 0x03, 0x0C, 0x0F
SELECT = (0x93, 0x95, 0x97)


def crc_a(data: bytes) -> bytes:
    """ISO/IEC 14443-3 CRC_A (preset 0x6363), low byte first as sent."""
    crc = 0x6363
    for byte in data:
        b = byte ^ (crc & 0xFF)
        b = (b ^ (b << 4)) & 0xFF
        crc = ((crc >> 8) ^ (b << 8) ^ (b << 3) ^ (b >> 4)) & 0xFFFF
    return bytes((crc & 0xFF, crc >> 8))


class Card:
    def __init__(self, uid: bytes):
        assert len(uid) in (4, 7, 10)
        self.uid = uid
        self.state = "IDLE"
        self.level = 0

    def parts(self) -> list[bytes]:
        """The 4 bytes the card sends at each cascade level; 0x88 (cascade tag) says more follow."""
        uid = self.uid
        if len(uid) == 4:
            return [uid]
        if len(uid) == 7:
            return [b"\x88" + uid[:3], uid[3:]]
        return [b"\x88" + uid[:3], b"\x88" + uid[3:6], uid[6:]]

    def answer(self, frame: bytes, last_bits: int) -> bytes | None:
        if last_bits == 7 and len(frame) == 1:
            if frame[0] == 0x52 or (frame[0] == 0x26 and self.state == "IDLE"):  # WUPA wakes halted cards too
                self.state, self.level = "READY", 0
                return b"\x04\x00" if len(self.uid) == 4 else b"\x44\x00" if len(self.uid) == 7 else b"\x84\x00"
            return None
        parts = self.parts()
        if self.state == "READY" and len(frame) >= 2 and frame[0] == SELECT[self.level]:
            part = parts[self.level]
            bcc = bytes((part[0] ^ part[1] ^ part[2] ^ part[3],))
            if frame[1] == 0x20 and len(frame) == 2:
                return part + bcc
            if frame[1] == 0x70 and len(frame) == 9 and frame[2:7] == part + bcc and crc_a(frame[:7]) == frame[7:]:
                last = self.level == len(parts) - 1
                sak = b"\x08" if last else b"\x04"
                if last:
                    self.state = "ACTIVE"
                else:
                    self.level += 1
                return sak + crc_a(sak)
        if self.state == "ACTIVE" and frame == b"\x50\x00" + crc_a(b"\x50\x00"):
            self.state = "HALT"
            return None
        if self.state != "HALT":
            self.state = "IDLE"  # anything unexpected sends a card back to IDLE
        return None


class RC522Chip:
    def __init__(self) -> None:
        self.card: Card | None = None
        self.misses = 0  # polls still to miss although a card is there (a card at the edge of the field)
        self.frames: list[bytes] = []  # every frame sent to the field
        self._reset()

    def place(self, uid: str) -> None:
        self.card = Card(bytes.fromhex(uid))

    def remove(self) -> None:
        self.card = None

    def _reset(self) -> None:
        self.regs = dict.fromkeys(range(0x40), 0)
        self.regs[VERSION] = 0x92
        self.fifo: list[int] = []

    # -- SPI ----------------------------------------------------------------------------------------------------

    def transfer(self, data: bytes) -> bytes:
        address = data[0]
        reg = (address >> 1) & 0x3F
        if address & 0x80:  # a read: each following byte clocks out the register's value
            return b"\x00" + bytes(self._read(reg) for _ in data[1:])
        for value in data[1:]:
            self._write(reg, value)
        return bytes(len(data))

    def _read(self, reg: int) -> int:
        if reg == FIFO_DATA:
            return self.fifo.pop(0) if self.fifo else 0
        if reg == FIFO_LEVEL:
            return len(self.fifo)
        return self.regs[reg]

    def _write(self, reg: int, value: int) -> None:
        if reg == FIFO_DATA:
            if len(self.fifo) < 64:
                self.fifo.append(value)
        elif reg == FIFO_LEVEL:
            if value & 0x80:
                self.fifo.clear()
        elif reg in (COM_IRQ, DIV_IRQ):
            bits = value & 0x7F
            self.regs[reg] = self.regs[reg] | bits if value & 0x80 else self.regs[reg] & ~bits
        elif reg == COMMAND:
            self.regs[COMMAND] = value & 0x0F
            self._command(value & 0x0F)
        elif reg == BIT_FRAMING:
            starting = value & 0x80 and not self.regs[BIT_FRAMING] & 0x80
            self.regs[BIT_FRAMING] = value
            if starting and self.regs[COMMAND] == TRANSCEIVE:
                self._transceive()
        elif reg != VERSION:
            self.regs[reg] = value

    def _command(self, command: int) -> None:
        if command == SOFT_RESET:
            self._reset()
        elif command == CALC_CRC:
            crc = crc_a(bytes(self.fifo))
            self.regs[CRC_RESULT_L], self.regs[CRC_RESULT_H] = crc[0], crc[1]
            self.regs[DIV_IRQ] |= 0x04
            self.regs[COMMAND] = IDLE

    def _transceive(self) -> None:
        frame = bytes(self.fifo)
        self.fifo.clear()
        self.frames.append(frame)
        answer = None
        if self.card is not None and self.misses > 0 and frame in (b"\x52", b"\x26"):
            self.misses -= 1
        elif self.card is not None:
            answer = self.card.answer(frame, self.regs[BIT_FRAMING] & 0x07)
        self.regs[ERROR] = 0
        self.regs[CONTROL] = 0  # all bits of the last byte valid
        if answer is None:
            self.regs[COM_IRQ] |= 0x01  # TimerIRq: the 25 ms timer ran out with nothing received
        else:
            self.fifo.extend(answer)
            self.regs[COM_IRQ] |= 0x30  # RxIRq | IdleIRq
