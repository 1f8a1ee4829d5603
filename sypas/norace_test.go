//go:build !race

package sypas

const raceEnabled = false
