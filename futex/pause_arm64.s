#include "textflag.h"

// func cpuRelax()
TEXT ·cpuRelax(SB), NOSPLIT|NOFRAME, $0-0
	YIELD
	RET

// func fullFence()
TEXT ·fullFence(SB), NOSPLIT|NOFRAME, $0-0
	DMB	$0xb // DMB ISH
	RET
