"""A minimal driver for the NXP MFRC522 (the "RC522" boards) on SPI: the UID of one ISO/IEC 14443 A card.

Written for this project from the MFRC522 datasheet (NXP, rev. 3.9) and ISO/IEC 14443-3; it does no
authentication and reads no blocks, which a check-in by UID does not need. It handles 4-, 7- and 10-byte
UIDs (MIFARE Classic, Ultralight, NTAG, DESFire) and one card at a time: with two cards in the field the
anticollision loop reports a collision and the read fails, and the player is asked to tap again by silence.

Each `read_uid` wakes the card with WUPA, selects it and halts it, so a card lying on the reader is read on
every call (REQA would not wake a halted card) and the caller decides what a repeat means.
"""

try:
    from micropython import const
except ImportError:  # on a host, for the tests

    def const(value):
        return value


# Registers (datasheet section 9).
_COMMAND = const(0x01)
_COM_IRQ = const(0x04)
_DIV_IRQ = const(0x05)
_ERROR = const(0x06)
_FIFO_DATA = const(0x09)
_FIFO_LEVEL = const(0x0A)
_CONTROL = const(0x0C)
_BIT_FRAMING = const(0x0D)
_COLL = const(0x0E)
_MODE = const(0x11)
_TX_CONTROL = const(0x14)
_TX_ASK = const(0x15)
_CRC_RESULT_H = const(0x21)
_CRC_RESULT_L = const(0x22)
_T_MODE = const(0x2A)
_T_PRESCALER = const(0x2B)
_T_RELOAD_H = const(0x2C)
_T_RELOAD_L = const(0x2D)
_VERSION = const(0x37)

# Chip commands (section 10.3).
_IDLE = const(0x00)
_CALC_CRC = const(0x03)
_TRANSCEIVE = const(0x0C)
_SOFT_RESET = const(0x0F)

# Card commands (ISO/IEC 14443-3).
_WUPA = const(0x52)
_HLTA = const(0x50)
_CASCADE_TAG = const(0x88)
_SELECT = (0x93, 0x95, 0x97)  # cascade levels 1, 2 and 3

_RX_OR_IDLE_IRQ = const(0x30)
_TIMER_IRQ = const(0x01)
_CRC_IRQ = const(0x04)
_ERRORS = const(0x1B)  # BufferOvfl, CollErr, ParityErr, ProtocolErr
# Status polls before a command is given up on. The chip's own timer ends a silent exchange after 25 ms; this
# only guards against a chip that stopped answering on the SPI bus (a loose wire), which must not hang the loop.
_POLLS = const(2000)


class MFRC522:
    def __init__(self, spi, cs, rst=None, sleep_ms=None):
        """spi: a machine.SPI (mode 0, MSB first, up to 10 MHz); cs and rst: output Pins."""
        self._spi = spi
        self._cs = cs
        self._sleep_ms = sleep_ms
        self._tx = bytearray(2)
        self._rx = bytearray(2)
        cs.value(1)
        if rst is not None:
            rst.value(0)
            self._pause(2)
            rst.value(1)  # leaving hard power-down starts the oscillator
            self._pause(50)
        self.reset()

    def _pause(self, ms):
        if self._sleep_ms is not None:
            self._sleep_ms(ms)

    def _write(self, reg, value):
        self._tx[0] = (reg << 1) & 0x7E
        self._tx[1] = value
        self._cs.value(0)
        self._spi.write(self._tx)
        self._cs.value(1)

    def _read(self, reg):
        self._tx[0] = 0x80 | ((reg << 1) & 0x7E)
        self._tx[1] = 0
        self._cs.value(0)
        self._spi.write_readinto(self._tx, self._rx)
        self._cs.value(1)
        return self._rx[1]

    def _set_bits(self, reg, mask):
        self._write(reg, self._read(reg) | mask)

    def _clear_bits(self, reg, mask):
        self._write(reg, self._read(reg) & (~mask & 0xFF))

    def reset(self):
        self._write(_COMMAND, _SOFT_RESET)
        self._pause(50)
        self._write(_T_MODE, 0x80)  # TAuto: the timer starts when a transmission ends
        self._write(_T_PRESCALER, 0xA9)  # 13.56 MHz / (2 * 169 + 1): 25 us a tick
        self._write(_T_RELOAD_H, 0x03)  # 1000 ticks: a card silent for 25 ms is not there
        self._write(_T_RELOAD_L, 0xE8)
        self._write(_TX_ASK, 0x40)  # 100 % ASK modulation, which type A cards need
        self._write(_MODE, 0x3D)  # CRC coprocessor preset 0x6363, the CRC_A of ISO/IEC 14443-3
        self._clear_bits(_COLL, 0x80)  # bits received after a collision are cleared
        self._set_bits(_TX_CONTROL, 0x03)  # antenna drivers TX1 and TX2 on

    def version(self):
        """VersionReg: 0x91 or 0x92 for NXP chips, 0x88 or 0x12 for common clones; 0x00 or 0xFF: not wired."""
        return self._read(_VERSION)

    def _transceive(self, data, last_bits=0):
        """Send a frame; the card's answer as bytes, or None when no valid answer came."""
        self._write(_COMMAND, _IDLE)
        self._write(_COM_IRQ, 0x7F)  # clear every interrupt request
        self._write(_FIFO_LEVEL, 0x80)  # flush the FIFO
        for byte in data:
            self._write(_FIFO_DATA, byte)
        self._write(_BIT_FRAMING, last_bits)  # bits of the last byte to send; 0 means all 8
        self._write(_COMMAND, _TRANSCEIVE)
        self._set_bits(_BIT_FRAMING, 0x80)  # StartSend
        answered = False
        for _ in range(_POLLS):
            irq = self._read(_COM_IRQ)
            if irq & _RX_OR_IDLE_IRQ:
                answered = True
                break
            if irq & _TIMER_IRQ:
                break
        self._clear_bits(_BIT_FRAMING, 0x80)
        self._write(_COMMAND, _IDLE)
        if not answered or self._read(_ERROR) & _ERRORS:
            return None
        n = self._read(_FIFO_LEVEL)
        out = bytearray(n)
        for i in range(n):
            out[i] = self._read(_FIFO_DATA)
        return bytes(out)

    def _crc(self, data):
        self._write(_COMMAND, _IDLE)
        self._write(_DIV_IRQ, _CRC_IRQ)  # Set2 = 0: clears CRCIRq
        self._write(_FIFO_LEVEL, 0x80)
        for byte in data:
            self._write(_FIFO_DATA, byte)
        self._write(_COMMAND, _CALC_CRC)
        done = False
        for _ in range(_POLLS):
            if self._read(_DIV_IRQ) & _CRC_IRQ:
                done = True
                break
        self._write(_COMMAND, _IDLE)
        if not done:
            return None
        return bytes((self._read(_CRC_RESULT_L), self._read(_CRC_RESULT_H)))

    def read_uid(self):
        """The UID of the card in the field as bytes, or None (no card, two cards, or a garbled exchange)."""
        atqa = self._transceive(bytes((_WUPA,)), 7)  # a short frame: 7 bits
        if atqa is None or len(atqa) != 2:
            return None
        uid = b""
        for level in _SELECT:
            part = self._transceive(bytes((level, 0x20)))  # anticollision: the card sends 4 UID bytes + BCC
            if part is None or len(part) != 5 or part[0] ^ part[1] ^ part[2] ^ part[3] != part[4]:
                return None
            frame = bytes((level, 0x70)) + part
            crc = self._crc(frame)
            if crc is None:
                return None
            sak = self._transceive(frame + crc)
            if sak is None or len(sak) != 3 or self._crc(sak[:1]) != sak[1:]:
                return None
            if sak[0] & 0x04 and part[0] == _CASCADE_TAG:
                uid += part[1:4]  # the UID goes on at the next cascade level
                continue
            uid += part[:4]
            self._halt()
            return uid
        return None

    def _halt(self):
        frame = bytes((_HLTA, 0x00))
        crc = self._crc(frame)
        if crc is not None:
            self._transceive(frame + crc)  # a halted card does not answer: the timeout is the success
