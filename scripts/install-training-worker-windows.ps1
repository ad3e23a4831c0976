<#
.SYNOPSIS
Install, or upgrade in place, the trainfleet worker as a Scheduled Task on Windows.

.DESCRIPTION
Run it from the project's clone in an elevated PowerShell once the venv exists
(py -3.11 -m venv .venv; .venv\Scripts\pip install -e .). It self-tests the host, enrols it
with the one-time code (`trainfleet token create HOST --enroll` on the operator's side), keeps
the token in %PROGRAMDATA%\trainfleet\worker.toml with an ACL limited to Administrators,
SYSTEM and the service account, and registers the task "trainfleet-worker": it starts at boot
as NETWORK SERVICE, is restarted when it stops, and is stopped gracefully through a stop
file. Re-running it upgrades in place and keeps the token. -WhatIf shows what it would do.
The task definition comes from `trainfleet install windows-task-xml`.

.EXAMPLE
.\scripts\install-training-worker-windows.ps1 -Receiver http://pi.lab:8470 -Code tfe_...
#>
[CmdletBinding(SupportsShouldProcess = $true)]
param(
    [string] $Receiver,
    [string] $Code,
    [string] $WorkDir = (Split-Path -Parent $PSScriptRoot),
    [string] $Venv = (Join-Path (Split-Path -Parent $PSScriptRoot) '.venv'),
    [string] $ServiceAccount = 'S-1-5-20',
    [int] $ShutdownGrace = 30
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$TaskName = 'trainfleet-worker'
$Python = Join-Path $Venv 'Scripts\python.exe'
$ConfigDir = Join-Path $env:ProgramData 'trainfleet'
$Config = Join-Path $ConfigDir 'worker.toml'
$StateDir = Join-Path $ConfigDir 'state'
$StopFile = Join-Path $StateDir 'stop'

function Invoke-Trainfleet {
    & $Python -m trainfleet @args
    if ($LASTEXITCODE -ne 0) { throw "trainfleet $($args[0]) failed (exit $LASTEXITCODE)" }
}

function Get-Sid([string] $Account) {
    if ($Account -match '^S-1-') { return $Account }
    $name = New-Object Security.Principal.NTAccount($Account)
    return $name.Translate([Security.Principal.SecurityIdentifier]).Value
}

# Task Scheduler can only end a task hard; the worker stops gracefully when its stop file
# appears (the same as SIGTERM: it ends the trainer and hands the job back). Kept in step
# with uninstall-training-worker-windows.ps1.
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

if (-not (Test-Path $Python)) {
    throw "no venv at ${Venv}: run 'py -3.11 -m venv .venv; .venv\Scripts\pip install -e .' first, or pass -Venv"
}
$identity = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
if (-not $WhatIfPreference -and -not $identity.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw 'run it from an elevated PowerShell (Run as administrator), or try -WhatIf first'
}
$WorkDir = (Resolve-Path $WorkDir).Path
$Sid = Get-Sid $ServiceAccount

Write-Host "==> self-test: trainfleet capability --workdir $WorkDir"
$capability = & $Python -m trainfleet capability --workdir $WorkDir | Out-String
if ($LASTEXITCODE -ne 0) {
    throw 'the self-test failed (see above): fix this host, then run the installer again'
}
$HostName = ($capability | ConvertFrom-Json).hostname
Write-Host "    host $HostName"

$enrolled = (Test-Path $Config) -and (Select-String -Path $Config -Pattern '^token = ' -Quiet)
if ($Code -and -not $enrolled) {
    if (-not $Receiver) { throw '-Code needs -Receiver URL' }
    if ($PSCmdlet.ShouldProcess($Config, "enrol $HostName with $Receiver and write its token")) {
        New-Item -ItemType Directory -Force -Path $ConfigDir, $StateDir | Out-Null
        Invoke-Trainfleet enroll --receiver $Receiver --code $Code --hostname $HostName `
            --config $Config --workdir $WorkDir --state-dir $StateDir
    }
} elseif ($enrolled) {
    Write-Host "==> already enrolled: keeping the token in $Config (upgrade in place)"
} else {
    throw "no -Code and no $Config yet: on the operator's machine run 'trainfleet token create $HostName --enroll'"
}

if ($PSCmdlet.ShouldProcess($Config, "limit access to Administrators, SYSTEM and $ServiceAccount")) {
    icacls $Config /inheritance:r /grant:r '*S-1-5-32-544:F' '*S-1-5-18:F' "*${Sid}:R" | Out-Null
    if ($LASTEXITCODE -ne 0) { throw "icacls failed on $Config" }
}
foreach ($dir in @($StateDir, $WorkDir)) {
    if ($PSCmdlet.ShouldProcess($dir, "let $ServiceAccount modify it")) {
        New-Item -ItemType Directory -Force -Path $dir | Out-Null
        icacls $dir /grant "*${Sid}:(OI)(CI)M" | Out-Null
        if ($LASTEXITCODE -ne 0) { throw "icacls failed on $dir" }
    }
}
if (-not $Venv.StartsWith($WorkDir) -and $PSCmdlet.ShouldProcess($Venv, "let $ServiceAccount run it")) {
    icacls $Venv /grant "*${Sid}:(OI)(CI)RX" | Out-Null
}

$XmlFile = Join-Path ([IO.Path]::GetTempPath()) 'trainfleet-worker-task.xml'
Invoke-Trainfleet install windows-task-xml --python $Python --config $Config --workdir $WorkDir `
    --state-dir $StateDir --user $Sid --shutdown-grace $ShutdownGrace --output $XmlFile
$xml = Get-Content -Raw -Encoding Unicode $XmlFile
Remove-Item -Force $XmlFile
if ($PSCmdlet.ShouldProcess($TaskName, 'register the Scheduled Task and (re)start the worker')) {
    Stop-Worker
    Register-ScheduledTask -TaskName $TaskName -Xml $xml -Force | Out-Null
    Start-ScheduledTask -TaskName $TaskName
}

Write-Host "==> done: the worker runs as $ServiceAccount in $WorkDir and starts at boot"
Write-Host "    logs:      Get-Content $StateDir\worker.log -Wait"
Write-Host "    status:    Get-ScheduledTask $TaskName | Get-ScheduledTaskInfo"
Write-Host "    upgrade:   git pull; $Venv\Scripts\pip install -e .; .\scripts\install-training-worker-windows.ps1"
Write-Host "    uninstall: .\scripts\uninstall-training-worker-windows.ps1"
