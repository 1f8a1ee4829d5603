#include "textflag.h"

// func cpuRelax()
TEXT ·cpuRelax(SB), NOSPLIT|NOFRAME, $0-0
	PAUSE
	RET

// func fullFence()
TEXT ·fullFence(SB), NOSPLIT|NOFRAME, $0-0
	MFENCE
	RET
