<#
.SYNOPSIS
Remove what install-training-worker-windows.ps1 added, and nothing else.

.DESCRIPTION
Stops the worker gracefully (it hands its job back), unregisters the "trainfleet-worker"
Scheduled Task and deletes %PROGRAMDATA%\trainfleet\worker.toml (its token). The state
directory (spool, job outputs, worker.log) is kept unless -Purge; -Purge refuses while the
spool holds a trained model not yet delivered, unless -Force. The ACL entries the installer
granted on the work directory are removed. -WhatIf shows what it would do. Revoke the host's
token on the receiver too: trainfleet token revoke HOST.
#>
[CmdletBinding(SupportsShouldProcess = $true)]
param(
    [string] $WorkDir = (Split-Path -Parent $PSScriptRoot),
    [string] $ServiceAccount = 'S-1-5-20',
    [int] $ShutdownGrace = 30,
    [switch] $Purge,
    [switch] $Force
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$TaskName = 'trainfleet-worker'
$ConfigDir = Join-Path $env:ProgramData 'trainfleet'
$Config = Join-Path $ConfigDir 'worker.toml'
$StateDir = Join-Path $ConfigDir 'state'
$StopFile = Join-Path $StateDir 'stop'

function Get-Sid([string] $Account) {
    if ($Account -match '^S-1-') { return $Account }
    $name = New-Object Security.Principal.NTAccount($Account)
    return $name.Translate([Security.Principal.SecurityIdentifier]).Value
}

# Kept in step with install-training-worker-windows.ps1.
function Stop-Worker {
    $task = Get-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
    if (-not $task) { return }
    Disable-ScheduledTask -TaskName $TaskName | Out-Null  # or the repeating trigger restarts it
    if ($task.State -ne 'Running') { return }
    Write-Host '==> asking the running worker to stop (it hands its job back)'
    New-Item -ItemType File -Force -Path $StopFile | Out-Null
    $deadline = (Get-Date).AddSeconds($ShutdownGrace + 60)
    while ((Get-ScheduledTask -TaskName $TaskName).State -eq 'Running' -and (Get-Date) -lt $deadline) {
        Start-Sleep -Seconds 2
    }
    if ((Get-ScheduledTask -TaskName $TaskName).State -eq 'Running') {
        Stop-ScheduledTask -TaskName $TaskName
    }
}

if (Get-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue) {
    if ($PSCmdlet.ShouldProcess($TaskName, 'stop the worker and unregister the Scheduled Task')) {
        Stop-Worker
        Unregister-ScheduledTask -TaskName $TaskName -Confirm:$false
    }
} else {
    Write-Host "==> no Scheduled Task $TaskName: the worker is not installed"
}

if ((Test-Path $Config) -and $PSCmdlet.ShouldProcess($Config, 'delete (it holds the token)')) {
    Remove-Item -Force $Config
}
if ((Test-Path $WorkDir) -and $PSCmdlet.ShouldProcess($WorkDir, "remove $ServiceAccount's access")) {
    icacls $WorkDir /remove "*$(Get-Sid $ServiceAccount)" | Out-Null
}

if ($Purge -and (Test-Path $StateDir)) {
    $undelivered = @(Get-ChildItem -Path (Join-Path $StateDir 'spool') -Filter '*.json' -ErrorAction SilentlyContinue)
    if ($undelivered.Count -gt 0 -and -not $Force) {
        throw "$StateDir\spool holds trained models not yet delivered: run the worker until they are, or pass -Force"
    }
    if ($PSCmdlet.ShouldProcess($StateDir, 'delete the state directory')) {
        Remove-Item -Recurse -Force $StateDir
    }
} elseif (Test-Path $StateDir) {
    Write-Host "==> kept $StateDir (spool, job outputs, worker.log); -Purge removes it"
}
if ((Test-Path $ConfigDir) -and -not (Get-ChildItem -Force $ConfigDir) -and $PSCmdlet.ShouldProcess($ConfigDir, 'remove the empty directory')) {
    Remove-Item -Force $ConfigDir
}

Write-Host "==> done. On the operator's side, revoke this host's token:"
Write-Host "    trainfleet token revoke $([System.Net.Dns]::GetHostName())"
