"""Host stand-ins for what the ESP32 firmware (firmware_bridges/esp32) imports from MicroPython.

`machine`, `network` and `umqtt.simple` are imported by the firmware under those top-level names (the test puts
this directory on sys.path); `host_clock` and `rc522_chip` are the tests' own instruments.
"""
