"""The compile report's SASS reading: tensor-core instructions and async copies count only inside loop bodies;
the persistent kernel's weight loads come before its first acquire poll."""
from gpt2_engine.kernels.compile_report import counts_in_loops, loads_before_wait

SASS = """
        /*0100*/                   HMMA.16816.F32 R4, R8, R12, R4 ;      /* prologue: not in a loop */
        /*0200*/               @P0 BRA 0x0500 ;                          /* forward branch: no loop */
        /*0300*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0310*/                   HGMMA.64x128x16.F32 gdesc[UR4], RZ ;
        /*0400*/               @P1 BRA 0x0300 ;                          /* back edge: loop [0x300, 0x400] */
        /*0500*/                   HMMA.16816.F32 R4, R8, R12, R4 ;      /* epilogue */
        /*0600*/                   BRA 0x0600;                           /* the trailing self-loop */
"""


def test_mma_counted_in_loops_only():
    assert counts_in_loops(SASS, "HMMA") == (1, 3)
    assert counts_in_loops(SASS, "HGMMA") == (1, 1)
    assert counts_in_loops("", "HMMA") == (0, 0)


def test_prefetching_copies_counted_in_loops_only():
    sass = SASS.replace("HGMMA.64x128x16.F32 gdesc[UR4], RZ", "LDGSTS.E.BYPASS.LTC128B.128 [R2], desc[UR4][R6.64]")
    assert counts_in_loops(sass, "LDGSTS") == (1, 1)
    assert counts_in_loops(SASS, "LDGSTS") == (0, 0)


PERSISTENT = """
        /*0f10*/                   LDG.E.128 R32, desc[UR10][R32.64] ;
        /*0f60*/              @!P0 LDG.E.STRONG.GPU R44, desc[UR10][R38.64] ;
        /*0f70*/              @!P0 CCTL.IVALL ;
        /*1720*/                   HMMA.16816.F32 R36, R36, R68, RZ ;
"""


def test_weight_loads_before_the_acquire_poll():
    assert loads_before_wait(PERSISTENT)
    assert loads_before_wait(PERSISTENT.replace("HMMA.16816.F32 R36, R36, R68, RZ", "FFMA R1, R2, R3, R4"))  # fp32: no MMA
    poll_first = PERSISTENT.replace("LDG.E.128 R32", "NOP R32")                 # no weight load ahead of the poll
    assert not loads_before_wait(poll_first)
    mma_first = PERSISTENT.replace("        /*0f60*/", "        /*0f50*/  HMMA.16816.F32 R1, R2, R3, R4 ;\n        /*0f60*/")
    assert not loads_before_wait(mma_first)                                     # an MMA before the poll
    assert not loads_before_wait(PERSISTENT.replace("CCTL.IVALL", "NOP"))      # no acquire poll at all
